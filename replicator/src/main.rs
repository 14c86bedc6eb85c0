//! `replicator`: the daemon and its command line. See the library crate for
//! the write path (`replicator::group`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    replicator::cli::main(replicator::cli::Cli::parse())
}
