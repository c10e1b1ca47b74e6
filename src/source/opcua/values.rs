//! OPC UA values as the rules see them, and the certificate a server last presented.

use std::path::{Path, PathBuf};

use opcua::client::Session;
use opcua::types::{NodeId, Variant};

use crate::event::Value;

use super::*;

/// A variant as the rules' value: numbers exactly (integers up to 2^53), booleans,
/// text.
pub fn convert(v: &Variant) -> Result<Value, String> {
    let int = |n: f64| -> Result<Value, String> {
        if n.abs() > EXACT_INTEGER {
            Err(format!("{n} is beyond 2^53 and would not count exactly"))
        } else {
            Ok(Value::Number(n))
        }
    };
    Ok(match v {
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(n) => Value::Number(f64::from(*n)),
        Variant::Byte(n) => Value::Number(f64::from(*n)),
        Variant::Int16(n) => Value::Number(f64::from(*n)),
        Variant::UInt16(n) => Value::Number(f64::from(*n)),
        Variant::Int32(n) => Value::Number(f64::from(*n)),
        Variant::UInt32(n) => Value::Number(f64::from(*n)),
        Variant::Int64(n) => int(*n as f64)?,
        Variant::UInt64(n) => int(*n as f64)?,
        Variant::Float(n) if n.is_finite() => Value::Number(f64::from(*n)),
        Variant::Double(n) if n.is_finite() => Value::Number(*n),
        Variant::String(s) => Value::Text(s.as_ref().to_string()),
        Variant::LocalizedText(t) => Value::Text(t.text.as_ref().to_string()),
        Variant::Empty => return Err("an empty value".into()),
        other => {
            return Err(format!(
                "type {:?} is not a number, boolean or text",
                other.type_id()
            ))
        }
    })
}

/// The newest file in `pki/rejected`: the certificate the server just showed.
pub(super) fn newest_rejected(pki: &Path) -> Option<PathBuf> {
    std::fs::read_dir(pki.join("rejected"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

/// Translates a browse path (from the Objects folder) to its NodeId.
pub async fn translate(session: &Session, steps: &[(u16, String)]) -> Result<NodeId, String> {
    use opcua::types::{
        BrowsePath, ObjectId, QualifiedName, ReferenceTypeId, RelativePath, RelativePathElement,
    };
    let path = BrowsePath {
        starting_node: ObjectId::ObjectsFolder.into(),
        relative_path: RelativePath {
            elements: Some(
                steps
                    .iter()
                    .map(|(ns, name)| RelativePathElement {
                        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                        is_inverse: false,
                        include_subtypes: true,
                        target_name: QualifiedName::new(*ns, name.as_str()),
                    })
                    .collect(),
            ),
        },
    };
    let results = session
        .translate_browse_paths_to_node_ids(&[path])
        .await
        .map_err(|e| e.to_string())?;
    let first = results.into_iter().next().ok_or("no answer")?;
    if first.status_code.is_bad() {
        return Err(first.status_code.to_string());
    }
    first
        .targets
        .and_then(|t| t.into_iter().next())
        .map(|t| t.target_id.node_id)
        .ok_or_else(|| "no target".to_string())
}
