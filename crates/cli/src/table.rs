//! Plain-text tables for list commands: each column as wide as its widest cell (docker's
//! layout), three spaces between columns, the last column unpadded.

/// A table of strings, printed with [`Table::print`].
pub struct Table {
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
            right: vec![false; headers.len()],
        }
    }

    /// Right-aligns column `column` (sizes, counts).
    pub fn right(mut self, column: usize) -> Table {
        self.right[column] = true;
        self
    }

    /// Adds a row; missing cells are empty.
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| c.to_string()).collect());
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.right.len();
        let width = |c: usize| {
            self.rows
                .iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, &w) in widths.iter().enumerate() {
                let cell = row.get(c).map_or("", String::as_str);
                let last = c + 1 == columns;
                if c > 0 {
                    line.push_str("   ");
                }
                match (self.right[c], last) {
                    (true, _) => line.push_str(&format!("{cell:>w$}")),
                    (false, true) => line.push_str(cell),
                    (false, false) => line.push_str(&format!("{cell:<w$}")),
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        out!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell() {
        let mut t = Table::new(&["NAME", "SIZE", "STATE"]).right(1);
        t.row(["a-rather-long-name", "1.5 MiB", "exited (code 3)"]);
        t.row(["b", "12 KiB", "running"]);
        assert_eq!(
            t.render(),
            "NAME                    SIZE   STATE\n\
             a-rather-long-name   1.5 MiB   exited (code 3)\n\
             b                     12 KiB   running\n"
        );
    }
}
