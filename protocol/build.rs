//! Generates the wire types from `proto/replication.proto` with prost-build,
//! using the protoc shipped inside the `protoc-bin-vendored` crate so that a
//! fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, set_var is fine here.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../proto/replication.proto");
    prost_build::Config::new().bytes(["."]).compile_protos(&["../proto/replication.proto"], &["../proto"])?;
    Ok(())
}
