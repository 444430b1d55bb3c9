//! Compiles every `proto/*.proto` with protox (pure Rust: no system `protoc`), then generates
//! prost types and their pbjson serde impls (snake_case field names, all fields emitted).
//! The A2A subset (`proto/a2a/*.proto`, package `lf.a2a.v1`) gets A2A's ProtoJSON instead:
//! camelCase names, defaults left out, unknown fields ignored.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    let a2a = root.join("a2a");
    files.extend(
        std::fs::read_dir(&a2a)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "proto")),
    );
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-changed={}", a2a.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("descriptor.bin"), &descriptor_bytes)?;

    let mut cfg = prost_build::Config::new();
    // Well-known types (Value, Struct) come from pbjson-types, which carry serde impls.
    cfg.prost_types_path("::pbjson_types");
    cfg.compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".tether"])?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .ignore_unknown_fields()
        .build(&[".lf"])?;
    Ok(())
}
