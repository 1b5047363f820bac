//! SMTP mailer.
