//! JSON schemas generated from the Rust types: recipes (for editors, via a
//! `#:schema` line) and `runner plan --json` output. Committed under schemas/.

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use crate::stage::Registry;

/// Schema of a recipe file with the given stage kinds.
pub fn recipe_schema(registry: &Registry) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let header = generator.subschema_for::<crate::recipe::RecipeHeader>();
    let executor = generator.subschema_for::<crate::recipe::executor::ExecutorSection>();
    let tracking = generator.subschema_for::<crate::tracking::TrackingSection>();
    let cache = generator.subschema_for::<crate::recipe::CacheSection>();
    let mut stage_variants = Vec::new();
    let mut defaults = Map::new();
    let mut kinds = Vec::new();
    for kind in registry.kinds() {
        let reference = kind.schema(&mut generator).to_value();
        kinds.push((kind.name(), reference.clone()));
        stage_variants.push(json!({
            "description": kind.summary(),
            "allOf": [reference],
            "properties": { "kind": { "const": kind.name() } },
            "required": ["kind"],
        }));
        defaults.insert(
            kind.name().to_string(),
            json!({ "description": format!("Defaults merged into every `{}` stage", kind.name()), "type": "object" }),
        );
    }
    let mut definitions = generator.take_definitions(true);
    // A stage table also carries `kind`, which the kinds' parameter types do not declare.
    for (name, reference) in kinds {
        let def_name = reference["$ref"]
            .as_str()
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or_default();
        if let Some(props) = definitions
            .get_mut(def_name)
            .and_then(|d| d.get_mut("properties"))
            .and_then(Value::as_object_mut)
        {
            props.insert("kind".into(), json!({ "const": name }));
            props.insert(crate::recipe::matrix::MATRIX.into(), json!({
                "description": "A sweep: parameter paths (`dpo.beta`, `lora.r`) to lists of values. The stage expands into one stage per combination, named `stage@beta=0.1-r=8`, each with its own key; stages that refer to it fan out with it.",
                "type": "object",
                "minProperties": 1,
                "additionalProperties": { "type": "array", "minItems": 1 },
            }));
            props.insert(crate::recipe::matrix::FAN_OUT.into(), json!({
                "description": "How this stage's matrix meets the swept stages it refers to: \"join\" (default) pairs axes of the same parameter path, \"cross\" crosses them.",
                "enum": ["join", "cross"],
            }));
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
            "executor": executor.to_value(),
            "tracking": tracking.to_value(),
            "cache": cache.to_value(),
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
        .into_root_schema_for::<crate::plan::render::PlanJson>();
    schema.to_value()
}
