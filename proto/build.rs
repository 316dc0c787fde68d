//! Generates Rust types from `proto/proto/**.proto` with prost. `protoc` comes from the
//! `protoc-bin-vendored` crate so a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let mut config = prost_build::Config::new();
    // serde derives feed `tributary events --json`; bytes and enums get readable encodings.
    config
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .type_attribute(".", "#[serde(rename_all = \"snake_case\")]")
        .field_attribute(
            "LogChunk.data",
            "#[serde(serialize_with = \"crate::json::bytes_as_text\")]",
        )
        .field_attribute(
            "LogChunk.stream",
            "#[serde(serialize_with = \"crate::json::stream_name\")]",
        )
        .field_attribute(
            "status",
            "#[serde(serialize_with = \"crate::json::status_name\")]",
        );
    config.compile_protos(
        &["proto/tributary/events/v1/events.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
