//! Mailer adapters against real peers.
