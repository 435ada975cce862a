fn main() {
    std::process::exit(lora_runner::cli::main());
}
