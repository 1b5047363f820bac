//! Black-box tests of the Prospects API: one binary, one helpers module. The contract suite
//! runs every test against the embedded store and against DynamoDB/SQS in the emulator.

mod campaigns;
mod cli;
mod contract;
mod crash;
mod events;
mod feedback;
mod hardening;
mod helpers;
mod iam;
mod secrets;
mod lambda;
mod mailers;
mod openapi;
mod reads;
mod round_trips;
mod template;
mod webhooks;
