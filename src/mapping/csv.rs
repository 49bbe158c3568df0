//! A small CSV reader for the lookup tables (account directory, exchange rates).
//!
//! Why not a CSV crate: the tables are simple (one record per line, optional `"` quoting) and
//! every error must name `file:line:column` of the offending cell, which is easiest when the
//! reader tracks columns itself. Blank lines and lines starting with `#` are skipped; a quoted
//! field may contain commas and `""` but not a line break.

/// One data row: its 1-based line and each cell with its 1-based column.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub line: usize,
    pub cells: Vec<(usize, String)>,
}

/// A parse problem at (line, column).
#[derive(Debug, Clone)]
pub(crate) struct CsvProblem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// A parsed table: the header (trimmed, lower-case) with its line, then the data rows.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub header_line: usize,
    pub header: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    /// The cell of `row` in column `name`, trimmed; `None` when the row is short.
    pub fn cell<'a>(&self, row: &'a Row, name: &str) -> Option<(usize, &'a str)> {
        let i = self.header.iter().position(|h| h == name)?;
        row.cells.get(i).map(|(c, v)| (*c, v.trim()))
    }
}

/// Parses `text`. The first non-blank, non-comment line is the header.
pub(crate) fn parse(text: &str) -> Result<Table, CsvProblem> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut header: Option<(usize, Vec<String>)> = None;
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let cells = split_line(raw, line)?;
        match &header {
            None => {
                header = Some((
                    line,
                    cells
                        .into_iter()
                        .map(|(_, c)| c.trim().to_ascii_lowercase())
                        .collect(),
                ))
            }
            Some((_, h)) => {
                if cells.len() != h.len() {
                    let column = cells.last().map_or(1, |(c, _)| *c);
                    return Err(CsvProblem {
                        line,
                        column,
                        message: format!(
                            "row has {} cells but the header has {} ({})",
                            cells.len(),
                            h.len(),
                            h.join(",")
                        ),
                    });
                }
                rows.push(Row { line, cells });
            }
        }
    }
    let Some((header_line, header)) = header else {
        return Err(CsvProblem {
            line: 1,
            column: 1,
            message: "the file is empty; it needs a header line".into(),
        });
    };
    Ok(Table {
        header_line,
        header,
        rows,
    })
}

/// Splits one line into cells with their 1-based starting columns (in characters).
fn split_line(raw: &str, line: usize) -> Result<Vec<(usize, String)>, CsvProblem> {
    let chars: Vec<char> = raw.trim_end_matches('\r').chars().collect();
    let mut cells = Vec::new();
    let mut i = 0;
    loop {
        let start = i + 1;
        let mut cell = String::new();
        // Leading spaces before a quote are allowed.
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j < chars.len() && chars[j] == '"' {
            i = j + 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(CsvProblem {
                            line,
                            column: j + 1,
                            message: "unclosed `\"` (a quoted cell must end on the same line)"
                                .into(),
                        })
                    }
                    Some('"') if chars.get(i + 1) == Some(&'"') => {
                        cell.push('"');
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        cell.push(*c);
                        i += 1;
                    }
                }
            }
            while i < chars.len() && chars[i] == ' ' {
                i += 1;
            }
            if i < chars.len() && chars[i] != ',' {
                return Err(CsvProblem {
                    line,
                    column: i + 1,
                    message: "unexpected text after a closing `\"`".into(),
                });
            }
        } else {
            while i < chars.len() && chars[i] != ',' {
                if chars[i] == '"' {
                    return Err(CsvProblem {
                        line,
                        column: i + 1,
                        message: "`\"` inside an unquoted cell; quote the whole cell".into(),
                    });
                }
                cell.push(chars[i]);
                i += 1;
            }
        }
        cells.push((start, cell));
        if i >= chars.len() {
            break;
        }
        i += 1; // the comma
    }
    Ok(cells)
}
