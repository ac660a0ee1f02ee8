//! The `boxlite` command line: a thin layer over the `boxlite` library.

fn main() {
    eprintln!("boxlite: not yet implemented");
    std::process::exit(2);
}
