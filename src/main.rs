use std::process::ExitCode;

fn main() -> ExitCode {
    credbroker::cli::main()
}
