//! Errors with their causes, for logs and answers. Error messages in the plugin and the
//! agent never repeat their `source`, so each cause appears once: `Chain` (as anyhow's
//! `{:#}`) walks the chain.

use std::{error::Error, fmt};

/// `top: cause: deeper cause`.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}

/// [`Chain`] as a string.
pub fn chain(e: &(dyn Error + '_)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::chain(&e), "outer: inner");
    }
}
