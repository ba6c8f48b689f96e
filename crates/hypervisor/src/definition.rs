//! The few facts of a libvirt domain XML that kvmha itself reads.
//!
//! libvirt parses its own XML; the lab driver has no libvirt, so it reads the name, UUID,
//! vCPU count and memory from the same format. The manager can then keep one kind of
//! definition (domain XML) for every driver.

use crate::{Error, Result};

/// Name, UUID and resources of a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDefinition {
    pub name: String,
    pub uuid: Option<String>,
    pub vcpus: u32,
    /// `<memory>`, KiB.
    pub max_memory_kib: u64,
    /// `<currentMemory>` when present, else `<memory>`, KiB.
    pub memory_kib: u64,
}

/// Upper bound on a definition's size: a real domain XML is a few KiB.
pub const DEFINITION_BYTES_MAX: usize = 1024 * 1024;

impl DomainDefinition {
    /// Parses a libvirt domain XML (`<domain>` root, `<name>`, `<memory>`, `<vcpu>`).
    pub fn parse(xml: &str) -> Result<Self> {
        if xml.len() > DEFINITION_BYTES_MAX {
            return Err(invalid(format!("definition is {} bytes, more than {DEFINITION_BYTES_MAX}", xml.len())));
        }
        let document = roxmltree::Document::parse(xml).map_err(|error| invalid(format!("not xml: {error}")))?;
        let root = document.root_element();
        if root.tag_name().name() != "domain" {
            return Err(invalid(format!("root element is <{}>, expected <domain>", root.tag_name().name())));
        }
        let child = |tag: &str| root.children().find(|node| node.has_tag_name(tag));

        let name = child("name").and_then(|node| node.text()).map(str::trim).unwrap_or_default().to_string();
        validate_domain_name(&name)?;

        let uuid = child("uuid")
            .and_then(|node| node.text())
            .map(|text| text.trim().to_string())
            .filter(|text| !text.is_empty());

        let vcpus = match child("vcpu") {
            None => 1,
            Some(node) => {
                let text = node.text().unwrap_or_default().trim();
                let vcpus: u32 = text.parse().map_err(|_| invalid(format!("<vcpu> {text:?} is not a count")))?;
                if vcpus == 0 {
                    return Err(invalid("<vcpu> must be at least 1".to_string()));
                }
                vcpus
            }
        };

        let memory_node = child("memory").ok_or_else(|| invalid("no <memory>".to_string()))?;
        let max_memory_kib = memory_kib(memory_node)?;
        let memory_kib = match child("currentMemory") {
            Some(node) => memory_kib(node)?,
            None => max_memory_kib,
        };
        if memory_kib > max_memory_kib {
            return Err(invalid(format!("<currentMemory> {memory_kib} KiB exceeds <memory> {max_memory_kib} KiB")));
        }

        Ok(DomainDefinition { name, uuid, vcpus, max_memory_kib, memory_kib })
    }
}

/// A minimal domain XML for a lab VM; libvirt would also accept its shape.
pub fn lab_domain_xml(name: &str, vcpus: u32, memory_mib: u64) -> String {
    format!(
        "<domain type='lab'>\n  <name>{name}</name>\n  <memory unit='MiB'>{memory_mib}</memory>\n  \
         <vcpu>{vcpus}</vcpu>\n  <os>\n    <type>hvm</type>\n  </os>\n</domain>\n"
    )
}

/// Domain names become file names (lab driver) and log fields: keep them plain.
/// The lab driver requires this; the libvirt driver leaves names to libvirt.
pub fn validate_domain_name(name: &str) -> Result<()> {
    const NAME_BYTES_MAX: usize = 63;
    if name.is_empty() {
        return Err(invalid("domain name is empty".to_string()));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(invalid(format!("domain name {name:?} is longer than {NAME_BYTES_MAX} bytes")));
    }
    let plain = name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    // Same rule as the storage crate's VM names; a leading '-' would read as a flag on
    // the VM process's command line.
    if !plain || name.starts_with('.') || name.starts_with('-') {
        return Err(invalid(format!(
            "domain name {name:?} must be ASCII letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )));
    }
    Ok(())
}

fn memory_kib(node: roxmltree::Node<'_, '_>) -> Result<u64> {
    let text = node.text().unwrap_or_default().trim();
    let amount: u64 =
        text.parse().map_err(|_| invalid(format!("<{}> {text:?} is not an amount", node.tag_name().name())))?;
    // libvirt's units (formatdomain.html#memory-allocation); the default is KiB.
    let unit = node.attribute("unit").unwrap_or("KiB");
    let bytes_per_unit: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1_000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        other => return Err(invalid(format!("unknown memory unit {other:?}"))),
    };
    let bytes =
        amount.checked_mul(bytes_per_unit).ok_or_else(|| invalid(format!("memory {amount} {unit} overflows")))?;
    Ok(bytes.div_ceil(1024))
}

fn invalid(message: String) -> Error {
    Error::InvalidDefinition { message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_current_memory() {
        let xml = "<domain type='kvm'><name>web-1</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>\
                   <memory unit='GiB'>2</memory><currentMemory>1048576</currentMemory><vcpu placement='static'>4</vcpu></domain>";
        let definition = DomainDefinition::parse(xml).unwrap();
        assert_eq!(definition.name, "web-1");
        assert_eq!(definition.uuid.as_deref(), Some("6695eb01-f6a4-8304-79aa-97f2502e193f"));
        assert_eq!(definition.vcpus, 4);
        assert_eq!(definition.max_memory_kib, 2 * 1024 * 1024);
        assert_eq!(definition.memory_kib, 1024 * 1024);
    }

    #[test]
    fn lab_xml_round_trips_through_the_parser() {
        let definition = DomainDefinition::parse(&lab_domain_xml("vm1", 2, 128)).unwrap();
        assert_eq!(definition.name, "vm1");
        assert_eq!(definition.vcpus, 2);
        assert_eq!(definition.memory_kib, 128 * 1024);
    }

    #[test]
    fn rejects_bad_definitions() {
        for xml in [
            "not xml",
            "<vm><name>a</name><memory>1</memory></vm>",
            "<domain><memory>1</memory></domain>",
            "<domain><name>../etc</name><memory>1</memory></domain>",
            "<domain><name>a b</name><memory>1</memory></domain>",
            "<domain><name>-x</name><memory>1</memory></domain>",
            "<domain><name>a</name></domain>",
            "<domain><name>a</name><memory unit='parsec'>1</memory></domain>",
            "<domain><name>a</name><memory>1</memory><vcpu>0</vcpu></domain>",
            "<domain><name>a</name><memory>1</memory><currentMemory>2</currentMemory></domain>",
        ] {
            let error = DomainDefinition::parse(xml).unwrap_err();
            assert!(matches!(error, Error::InvalidDefinition { .. }), "{xml}: {error}");
        }
    }
}
