//! Integration tests: real PostgreSQL (password-checking, throwaway), real
//! mTLS gRPC, the real binary where the CLI is the product.

mod support;

mod bench;
mod certificates;
mod faults;
mod lease_path;
