//! Generates the gRPC code from the workspace's `proto/` (at the root: the
//! API is the project's, not this crate's). protoc comes from the
//! `protoc-bin-vendored` crate so a fresh machine builds with cargo alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Safe here: build scripts are single-threaded and prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("credbroker_descriptor.bin"))
        // Lease carries the password (and the DSN holding it): its Debug is
        // written by hand in src/pb_debug.rs, redacting both.
        .skip_debug([".credbroker.v1.Lease", ".credbroker.v1.StaticCredential"])
        .compile_protos(
            &[
                std::path::PathBuf::from("../../proto/credbroker/v1/broker.proto"),
                std::path::PathBuf::from("../../proto/credbroker/v1/admin.proto"),
                std::path::PathBuf::from("../../proto/credbroker/v1/access.proto"),
            ],
            &[std::path::PathBuf::from("../../proto"), include],
        )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
