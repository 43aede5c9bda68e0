//! Compiles `proto/lorasweep.proto` with `protox` (a protobuf compiler written in Rust), so
//! building lorasweep never needs `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_file = "proto/lorasweep.proto";
    println!("cargo:rerun-if-changed={proto_file}");
    let descriptors = protox::compile([proto_file], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
