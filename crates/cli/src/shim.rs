//! `boxlite-shim`: the per-Box process that owns a running Box (see `boxlite::shim`).

fn main() {
    eprintln!("boxlite-shim: not yet implemented");
    std::process::exit(2);
}
