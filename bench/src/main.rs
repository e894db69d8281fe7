//! chunkbench: benchmarks whose every figure is printed beside its baseline from the same run.

use clap::Parser;

/// Benchmarks for chunkserver; each figure is printed beside a baseline measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "chunkbench", version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    println!("chunkbench: no benchmark is built yet; see docs/benchmarking.md for what is planned");
}
