//! Single `Range: bytes=…` requests (RFC 9110 §14), the form registries support.

/// An inclusive byte range resolved against a known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// Syntactically not a single bytes range (or several ranges): serve the whole body.
    Ignore,
    /// A valid range that lies outside the body: 416.
    Unsatisfiable,
}

/// Parses a `Range` header value against a body of `len` bytes.
pub fn parse_range(value: &str, len: u64) -> Result<ByteRange, RangeError> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Ignore)?
        .trim();
    if spec.contains(',') {
        return Err(RangeError::Ignore);
    }
    let (first, last) = spec.split_once('-').ok_or(RangeError::Ignore)?;
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RangeError::Ignore);
        }
        // Digits beyond u64 are a position past any body: the largest one stands for them
        // (a last position is clamped, a first one is unsatisfiable), never "no range".
        Ok(s.parse::<u64>().unwrap_or(u64::MAX))
    };
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let n = num(last)?;
        if n == 0 || len == 0 {
            return Err(RangeError::Unsatisfiable);
        }
        return Ok(ByteRange {
            start: len.saturating_sub(n),
            end: len - 1,
        });
    }
    let start = num(first)?;
    let end = if last.is_empty() {
        u64::MAX
    } else {
        num(last)?
    };
    if end < start {
        return Err(RangeError::Ignore);
    }
    if start >= len {
        return Err(RangeError::Unsatisfiable);
    }
    Ok(ByteRange {
        start,
        end: end.min(len - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases() {
        let r = |s, e| Ok(ByteRange { start: s, end: e });
        let table: &[(&str, u64, Result<ByteRange, RangeError>)] = &[
            ("bytes=0-9", 100, r(0, 9)),
            ("bytes=10-", 100, r(10, 99)),
            ("bytes=-10", 100, r(90, 99)),
            ("bytes=-1000", 100, r(0, 99)),
            ("bytes=90-1000", 100, r(90, 99)),
            ("bytes=99-99", 100, r(99, 99)),
            (" bytes= 1 - 2 ", 100, r(1, 2)),
            ("bytes=100-", 100, Err(RangeError::Unsatisfiable)),
            ("bytes=100-200", 100, Err(RangeError::Unsatisfiable)),
            ("bytes=-0", 100, Err(RangeError::Unsatisfiable)),
            ("bytes=0-0", 0, Err(RangeError::Unsatisfiable)),
            ("bytes=5-1", 100, Err(RangeError::Ignore)),
            ("bytes=0-1,5-6", 100, Err(RangeError::Ignore)),
            ("items=0-1", 100, Err(RangeError::Ignore)),
            ("bytes=a-b", 100, Err(RangeError::Ignore)),
            ("bytes=+1-2", 100, Err(RangeError::Ignore)),
            ("bytes=-", 100, Err(RangeError::Ignore)),
            ("bytes=", 100, Err(RangeError::Ignore)),
            (
                "bytes=99999999999999999999-",
                100,
                Err(RangeError::Unsatisfiable),
            ),
            ("bytes=0-99999999999999999999", 100, r(0, 99)),
            ("bytes=-99999999999999999999", 100, r(0, 99)),
        ];
        for (value, len, want) in table {
            assert_eq!(parse_range(value, *len), *want, "{value:?} len {len}");
        }
    }
}
