//! docs/configuration.md is generated from the config types' source: every field of
//! manager.toml, agent.toml and their `[timing]` table, with its type, whether it is
//! required, and its doc comment. This test regenerates it and fails when
//!
//! - a config field has no doc comment (the reference would have a hole), or
//! - the committed file differs from what the source says (it drifted).
//!
//! `KVMHA_BLESS=1 cargo test -p kvmha --test config_reference` rewrites the file.
//!
//! The source is read line by line (the files are rustfmt-formatted): structs that derive
//! `Deserialize`, their `///` docs, `#[serde(...)]` attributes and `pub field: Type,` lines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Clone, Debug)]
struct Field {
    name: String,
    ty: String,
    doc: String,
    serde: String,
}

#[derive(Clone, Debug)]
struct Item {
    doc: String,
    fields: Vec<Field>,
    /// Enum variants as written in TOML (for `rename_all = "lowercase"` enums).
    variants: Vec<String>,
}

/// Every `Deserialize` struct and enum of one source file, by name.
fn items(path: &Path) -> BTreeMap<String, Item> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut items = BTreeMap::new();
    let mut doc: Vec<String> = Vec::new();
    let mut attributes: Vec<String> = Vec::new();
    let mut current: Option<(String, Item, bool, bool)> = None; // name, item, is_enum, lowercase
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some((name, item, is_enum, lowercase)) = current.as_mut() {
            if trimmed == "}" && !line.starts_with("        ") {
                items.insert(name.clone(), item.clone());
                current = None;
                doc.clear();
                attributes.clear();
                continue;
            }
            if let Some(text) = trimmed.strip_prefix("///") {
                doc.push(text.trim().to_owned());
            } else if trimmed.starts_with("#[") {
                attributes.push(trimmed.to_owned());
            } else if *is_enum {
                let variant = trimmed.trim_end_matches(',');
                if !variant.is_empty() && variant.chars().all(|c| c.is_alphanumeric()) {
                    item.variants.push(if *lowercase { variant.to_lowercase() } else { variant.to_owned() });
                }
                doc.clear();
                attributes.clear();
            } else if let Some(rest) = trimmed.strip_prefix("pub ") {
                if let Some((name, ty)) = rest.split_once(": ") {
                    item.fields.push(Field {
                        name: name.to_owned(),
                        ty: ty.trim_end_matches(',').to_owned(),
                        doc: doc.join(" "),
                        serde: attributes.iter().filter(|a| a.starts_with("#[serde")).cloned().collect(),
                    });
                }
                doc.clear();
                attributes.clear();
            }
            continue;
        }
        if let Some(text) = trimmed.strip_prefix("///") {
            doc.push(text.trim().to_owned());
        } else if trimmed.starts_with("#[") {
            attributes.push(trimmed.to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("pub struct ").or_else(|| trimmed.strip_prefix("pub enum ")) {
            let deserialize = attributes.iter().any(|a| a.contains("Deserialize"));
            let name = rest.split([' ', '{', '(', '<']).next().unwrap_or_default().to_owned();
            if deserialize && rest.ends_with('{') {
                let is_enum = trimmed.starts_with("pub enum");
                let lowercase = attributes.iter().any(|a| a.contains("rename_all = \"lowercase\""));
                current = Some((
                    name,
                    Item { doc: doc.join(" "), fields: Vec::new(), variants: Vec::new() },
                    is_enum,
                    lowercase,
                ));
            }
            doc.clear();
            attributes.clear();
        } else if !trimmed.is_empty() {
            doc.clear();
            attributes.clear();
        }
    }
    items
}

/// `Option<Vec<String>>` → ("Vec<String>", optional).
fn unwrap_option(ty: &str) -> (&str, bool) {
    match ty.strip_prefix("Option<").and_then(|rest| rest.strip_suffix('>')) {
        Some(inner) => (inner, true),
        None => (ty, false),
    }
}

enum Shape<'a> {
    Scalar(String),
    Table(&'a str),
    MapOf(&'a str),
    ArrayOf(&'a str),
}

fn shape<'a>(ty: &'a str, items: &BTreeMap<String, Item>) -> Shape<'a> {
    if let Some(inner) = ty.strip_prefix("BTreeMap<String, ").and_then(|rest| rest.strip_suffix('>')) {
        if items.get(inner).is_some_and(|item| item.variants.is_empty()) {
            return Shape::MapOf(inner);
        }
    }
    if let Some(inner) = ty.strip_prefix("Vec<").and_then(|rest| rest.strip_suffix('>')) {
        if items.get(inner).is_some_and(|item| item.variants.is_empty()) {
            return Shape::ArrayOf(inner);
        }
        return Shape::Scalar(format!("array of {}", scalar(inner, items)));
    }
    if items.get(ty).is_some_and(|item| item.variants.is_empty()) {
        return Shape::Table(ty);
    }
    Shape::Scalar(scalar(ty, items))
}

fn scalar(ty: &str, items: &BTreeMap<String, Item>) -> String {
    match ty {
        "String" => "string".to_owned(),
        "PathBuf" => "path".to_owned(),
        "bool" => "boolean".to_owned(),
        "u32" | "u64" | "usize" | "i64" => "integer".to_owned(),
        other => match items.get(other) {
            Some(item) if !item.variants.is_empty() => {
                item.variants.iter().map(|variant| format!("`\"{variant}\"`")).collect::<Vec<_>>().join(" or ")
            }
            _ => other.to_owned(),
        },
    }
}

struct Generator<'a> {
    items: &'a BTreeMap<String, Item>,
    out: String,
    missing: Vec<String>,
}

impl Generator<'_> {
    fn table(&mut self, source: &str, struct_name: &str, heading: &str) {
        let item = self.items.get(struct_name).unwrap_or_else(|| panic!("{source}: no struct {struct_name}")).clone();
        self.out.push_str(&format!("\n### `{heading}`\n\n"));
        if !item.doc.is_empty() {
            self.out.push_str(&format!("{}\n\n", item.doc));
        }
        self.out.push_str("| key | type | | meaning |\n| --- | --- | --- | --- |\n");
        let mut nested = Vec::new();
        for field in &item.fields {
            if field.doc.is_empty() {
                self.missing.push(format!("{source}: {struct_name}.{}", field.name));
            }
            let (ty, optional) = unwrap_option(&field.ty);
            let defaulted = field.serde.contains("default");
            let need = if optional || defaulted { "optional" } else { "required" };
            let prefix = if heading == "(top level)" { "" } else { heading.trim_matches(|c| c == '[' || c == ']') };
            let (kind, child) = match shape(ty, self.items) {
                Shape::Scalar(kind) => (kind, None),
                Shape::Table(inner) => {
                    ("table".to_owned(), Some((inner.to_owned(), join(prefix, &field.name, "[", "]"))))
                }
                Shape::MapOf(inner) => (
                    "tables by name".to_owned(),
                    Some((inner.to_owned(), join(prefix, &format!("{}.NAME", field.name), "[", "]"))),
                ),
                Shape::ArrayOf(inner) => {
                    ("array of tables".to_owned(), Some((inner.to_owned(), join(prefix, &field.name, "[[", "]]"))))
                }
            };
            self.out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                field.name,
                kind,
                need,
                field.doc.replace('|', "\\|")
            ));
            if let Some(child) = child {
                nested.push(child);
            }
        }
        for (inner, heading) in nested {
            self.table(source, &inner, &heading);
        }
    }
}

fn join(prefix: &str, name: &str, open: &str, close: &str) -> String {
    if prefix.is_empty() {
        format!("{open}{name}{close}")
    } else {
        format!("{open}{prefix}.{name}{close}")
    }
}

fn generate() -> (String, Vec<String>) {
    let root = repo();
    let timing = items(&root.join("crates/core/src/timing.rs"));
    let mut out = String::from(
        "<!-- GENERATED by crates/kvmha/tests/config_reference.rs from the config types' doc comments.\n     \
         Do not edit: change the doc comment, then run\n     \
         KVMHA_BLESS=1 cargo test -p kvmha --test config_reference -->\n\n\
         # Configuration reference\n\n\
         Every key kvmha reads, with its type, whether it is required, and what it means. Unknown\n\
         keys are refused (a typo is an error naming the file and the key, not a silent default).\n\
         `kvmha manager init` and `kvmha agent join` write working files; samples for real hosts\n\
         are in `packaging/config/`. Timing profiles and what each guarantees: [timing.md](timing.md).\n",
    );
    let mut missing = Vec::new();
    for (title, file, root_struct, intro) in [
        (
            "manager.toml",
            "crates/manager/src/config.rs",
            "RawConfig",
            "Read by `kvmha manager run --config FILE`. Relative paths are relative to the file.",
        ),
        (
            "agent.toml",
            "crates/agent/src/config.rs",
            "RawConfig",
            "Read by `kvmha agent run --config FILE`. Relative paths are relative to the file.",
        ),
    ] {
        let mut items = items(&root.join(file));
        for (name, item) in &timing {
            items.entry(name.clone()).or_insert_with(|| item.clone());
        }
        out.push_str(&format!("\n## {title}\n\n{intro}\n"));
        let mut generator = Generator { items: &items, out: String::new(), missing: Vec::new() };
        generator.table(file, root_struct, "(top level)");
        out.push_str(&generator.out.replace("### `(top level)`", "### Top level"));
        missing.extend(generator.missing);
    }
    missing.sort();
    missing.dedup();
    (out, missing)
}

#[test]
fn every_config_field_is_documented_and_docs_configuration_md_is_current() {
    let (text, missing) = generate();
    assert!(missing.is_empty(), "config fields without a doc comment (add a `///` line):\n  {}", missing.join("\n  "));
    for key in ["api_listen", "password_file", "[hosts.NAME.bmc]", "[[pools]]", "ping_timeout_ms", "[watchdog]"] {
        assert!(text.contains(key), "the reference lacks {key}:\n{text}");
    }
    let path = repo().join("docs/configuration.md");
    if std::env::var_os("KVMHA_BLESS").is_some() {
        std::fs::write(&path, &text).expect("write docs/configuration.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "docs/configuration.md is not what the config types say: run\n  KVMHA_BLESS=1 cargo test -p kvmha --test config_reference\nand commit the result"
    );
}

#[test]
fn a_field_without_a_doc_comment_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.rs");
    std::fs::write(
        &file,
        "#[derive(Deserialize)]\npub struct RawConfig {\n    /// Documented.\n    pub good: String,\n    pub bare: u64,\n}\n",
    )
    .unwrap();
    let items = items(&file);
    let mut generator = Generator { items: &items, out: String::new(), missing: Vec::new() };
    generator.table("config.rs", "RawConfig", "(top level)");
    assert_eq!(generator.missing, ["config.rs: RawConfig.bare"]);
    assert!(generator.out.contains("| `good` | string | required | Documented. |"), "{}", generator.out);
}
