//! Just enough JSON output for `--json`: objects of strings and numbers, one per line.

use std::fmt::Write;

/// Builds one JSON object.
#[derive(Default)]
pub struct Object(String);

impl Object {
    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        quote(&mut self.0, value);
        self
    }

    pub fn num(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }

    pub fn bool(self, key: &str, value: bool) -> Self {
        self.num(key, value)
    }

    /// A value that is already JSON.
    pub fn raw(mut self, key: &str, json: &str) -> Self {
        self.key(key);
        self.0.push_str(json);
        self
    }

    fn key(&mut self, key: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        quote(&mut self.0, key);
        self.0.push(':');
    }

    pub fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        self.0
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_strings() {
        let o = super::Object::default()
            .str("a\"b", "x\ny\\")
            .num("n", 3)
            .finish();
        assert_eq!(o, r#"{"a\"b":"x\u000ay\\","n":3}"#);
    }
}
