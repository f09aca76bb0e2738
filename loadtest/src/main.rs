fn main() {
    eprintln!("ferry-loadtest: not built yet; see the load generator issue");
    std::process::exit(2);
}
