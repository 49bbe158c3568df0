fn main() -> std::process::ExitCode {
    billsync::cli::main()
}
