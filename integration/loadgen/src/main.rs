//! meridian-loadgen: the docker-compose demo's load generator (being built).

fn main() {
    eprintln!("meridian-loadgen: not built yet");
    std::process::exit(2);
}
