//! Integration tests: real PostgreSQL (password-checking, throwaway), real
//! mTLS gRPC, the real binary where the CLI is the product.

mod support;

mod access;
mod admin;
mod alerts;
mod bench;
mod certificates;
mod cluster;
mod console;
mod db_tls;
mod demo;
mod drain;
mod events;
mod failover;
mod faults;
mod first_hour;
mod gate;
mod ha;
mod hostile;
mod incident;
mod lease_path;
mod limits;
mod mysql;
mod pools;
mod rounds;
mod shapes;
mod shares;
mod sidecar;
mod static_roles;
mod store_migrate;
mod store_suite;
mod vault_api;
mod vault_cache;
