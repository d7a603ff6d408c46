//! Generates the gRPC code from the .proto with protox (pure Rust), so building needs no
//! system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/vpc_ebpf/cni/v1/cni.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(cfg!(feature = "client"))
        .build_server(cfg!(feature = "server"))
        .compile_fds(fds)?;
    Ok(())
}
