/// Allocation failures end with a message naming the stage and exit 3
/// (lora_runner::alloc_guard), not an abort.
#[global_allocator]
static ALLOCATOR: lora_runner::alloc_guard::Guarded = lora_runner::alloc_guard::Guarded;

fn main() {
    std::process::exit(lora_runner::cli::main());
}
