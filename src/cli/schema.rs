//! `runner schema`: the JSON schemas of recipes, plans and comparisons.

use super::{Context, Error};
use crate::schema;

#[derive(clap::Args, Debug)]
pub struct SchemaArgs {
    /// Print the schema of `runner plan --json` output instead.
    #[arg(long, conflicts_with = "compare")]
    plan: bool,
    /// Print the schema of `runner compare --json` output instead.
    #[arg(long)]
    compare: bool,
}

pub fn schema(ctx: &Context, args: &SchemaArgs) -> Result<(), Error> {
    let schema = if args.plan {
        schema::plan_schema()
    } else if args.compare {
        crate::compare::compare_schema()
    } else {
        schema::recipe_schema(ctx.registry)
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&schema).expect("schema serializes")
    );
    Ok(())
}
