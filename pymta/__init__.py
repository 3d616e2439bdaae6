"""pymta: a mail transfer agent in the tradition of sendmail."""
