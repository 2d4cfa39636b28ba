//! The `compress` binary: everything is in the library ([`compress::main`]).

fn main() -> std::process::ExitCode {
    compress::main()
}
