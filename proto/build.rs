//! Generates Rust from `proto/proto/**.proto`: prost messages for the events and the API, tonic
//! clients and servers for the API, and a file descriptor set for gRPC reflection. `protoc`
//! comes from the `protoc-bin-vendored` crate so a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut builder = tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tributary_descriptor.bin"))
        // serde derives feed `tributary events --json`; bytes and enums get readable encodings.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .type_attribute(".", "#[serde(rename_all = \"snake_case\")]")
        .field_attribute(
            ".tributary.events.v1.LogChunk.data",
            "#[serde(serialize_with = \"crate::json::bytes_as_text\")]",
        )
        .field_attribute(
            ".tributary.events.v1.LogChunk.stream",
            "#[serde(serialize_with = \"crate::json::stream_name\")]",
        )
        .field_attribute(
            ".tributary.api.v1.LogLine.data",
            "#[serde(serialize_with = \"crate::json::bytes_as_text\")]",
        );
    for message in ["StepFinished", "JobFinished", "BuildFinished"] {
        builder = builder.field_attribute(
            format!(".tributary.events.v1.{message}.status"),
            "#[serde(serialize_with = \"crate::json::status_name\")]",
        );
    }
    builder.compile_protos(
        &[
            "proto/tributary/events/v1/events.proto",
            "proto/tributary/api/v1/api.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
