//! `report.html`: the report document as one self-contained page, every plot inlined as
//! SVG, no script and nothing fetched.

use std::collections::BTreeMap;

use super::tables::{Block, Span};

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d7d7d7; padding: .3rem .55rem; text-align: left;
         white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f5f6f8; white-space: normal; }
.table-wrap { overflow-x: auto; max-width: 100%; }
tr:nth-child(even) td { background: #fafafa; }
td.failed { color: #b00020; font-weight: 600; }
td.pending { color: #8a6d00; }
td.better { color: #0b6b2b; font-weight: 600; }
td.worse { color: #b00020; font-weight: 600; }
figure { margin: 1rem 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
";

/// The classes of a table cell: numbers align right; failed, pending, better and worse
/// cells are coloured.
fn cell_class(cell: &str) -> String {
    let mut classes = Vec::new();
    if cell
        .chars()
        .next()
        .is_some_and(|first| first.is_ascii_digit() || "+-–".contains(first))
    {
        classes.push("num");
    }
    if cell == "failed" || cell.ends_with("failed)") {
        classes.push("failed");
    } else if cell == "pending" || cell.ends_with("pending)") {
        classes.push("pending");
    } else if cell.ends_with("* better") {
        classes.push("better");
    } else if cell.ends_with("* worse") {
        classes.push("worse");
    }
    if classes.is_empty() {
        String::new()
    } else {
        format!(" class=\"{}\"", classes.join(" "))
    }
}

/// The page: `blocks` rendered, each image replaced by its SVG from `svgs` (by file name).
pub fn page(title: &str, blocks: &[Block], svgs: &BTreeMap<String, String>) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(title)
    );
    for block in blocks {
        match block {
            Block::Heading(level, heading) => {
                out.push_str(&format!("<h{level}>{}</h{level}>\n", escape(heading)));
            }
            Block::Paragraph(spans) => {
                out.push_str("<p>");
                for span in spans {
                    match span {
                        Span::Text(content) => out.push_str(&escape(content)),
                        Span::Code(content) => {
                            out.push_str(&format!("<code>{}</code>", escape(content)))
                        }
                        Span::Strong(content) => {
                            out.push_str(&format!("<strong>{}</strong>", escape(content)))
                        }
                    }
                }
                out.push_str("</p>\n");
            }
            Block::Table(header, rows) => {
                out.push_str("<div class=\"table-wrap\">\n<table>\n<thead><tr>");
                for name in header {
                    out.push_str(&format!("<th>{}</th>", escape(name)));
                }
                out.push_str("</tr></thead>\n<tbody>\n");
                for row in rows {
                    out.push_str("<tr>");
                    for cell in row {
                        out.push_str(&format!("<td{}>{}</td>", cell_class(cell), escape(cell)));
                    }
                    out.push_str("</tr>\n");
                }
                out.push_str("</tbody>\n</table>\n</div>\n");
            }
            Block::List(items) => {
                out.push_str("<ul>\n");
                for item in items {
                    out.push_str(&format!("<li>{}</li>\n", escape(item)));
                }
                out.push_str("</ul>\n");
            }
            Block::Image(file, description) => {
                let Some(svg) = svgs.get(file) else {
                    continue;
                };
                let id = file.trim_end_matches(".svg");
                out.push_str(&format!(
                    "<figure id=\"{}\">\n{}\n<figcaption>{} ({})</figcaption>\n</figure>\n",
                    escape(id),
                    inline_svg(svg, description),
                    escape(description),
                    escape(file)
                ));
            }
        }
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// An SVG document as inline markup: without an XML declaration, with an accessible name.
fn inline_svg(svg: &str, description: &str) -> String {
    let body = match svg.find("<svg") {
        Some(start) => &svg[start..],
        None => svg,
    };
    body.replacen(
        "<svg",
        &format!("<svg role=\"img\" aria-label=\"{}\"", escape(description)),
        1,
    )
}
