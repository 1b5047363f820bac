//! Amazon SES v2 mailer.
