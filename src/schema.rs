//! JSON schemas generated from the Rust types: recipes (for editors, via a
//! `#:schema` line) and `runner plan --json` output. Committed under schemas/.

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use crate::stage::Registry;

/// Schema of a recipe file with the given stage kinds.
pub fn recipe_schema(registry: &Registry) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let header = generator.subschema_for::<crate::recipe::RecipeHeader>();
    let mut stage_variants = Vec::new();
    let mut defaults = Map::new();
    for kind in registry.kinds() {
        let reference = kind.schema(&mut generator).to_value();
        stage_variants.push(json!({
            "description": kind.summary(),
            "allOf": [reference.clone()],
            "properties": { "kind": { "const": kind.name() } },
            "required": ["kind"],
        }));
        // Defaults are partial stage tables: same keys, none required.
        defaults.insert(
            kind.name().to_string(),
            json!({ "description": format!("Defaults merged into every `{}` stage", kind.name()), "type": "object" }),
        );
    }
    let mut definitions = generator.take_definitions(true);
    // A stage table carries `kind`, which the kind structs do not declare: allow it.
    for def in definitions.values_mut() {
        if let Some(obj) = def.as_object_mut() {
            if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
                if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
                    if props.contains_key("model") || props.contains_key("path") || props.contains_key("from") {
                        props.insert("kind".into(), json!({ "type": "string" }));
                    }
                }
            }
        }
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lora-runner recipe",
        "description": "A TOML recipe declaring the stages of a LoRA fine-tuning pipeline.",
        "type": "object",
        "additionalProperties": false,
        "required": ["recipe", "stages"],
        "properties": {
            "recipe": header.to_value(),
            "defaults": { "type": "object", "additionalProperties": false, "properties": defaults },
            "stages": {
                "type": "object",
                "description": "Stages by name; references between them make the DAG.",
                "additionalProperties": { "oneOf": stage_variants },
            },
        },
        "$defs": definitions,
    })
}

/// Schema of `runner plan --json`.
pub fn plan_schema() -> Value {
    let schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<crate::report::PlanJson>();
    schema.to_value()
}
