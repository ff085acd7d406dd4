//! One-way WAN delays between the regions of a local cluster, and the
//! `--wan-delay` syntax that sets them (`us-east:eu-west=40ms,us-east:us-west=35ms`).
//!
//! A delay belongs to an unordered pair of regions (symmetric); a pair that is
//! not given, and traffic within a region, has no delay. The launcher applies
//! the delay in each direction of a [`crate::wanlink::Link`], so a round trip
//! across a 40 ms pair takes about 80 ms. Pure: parsing and lookup only.

use std::collections::BTreeMap;
use std::time::Duration;

/// Symmetric one-way delays between pairs of regions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WanDelays {
    /// Keyed by the pair in sorted order.
    pairs: BTreeMap<(String, String), Duration>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl WanDelays {
    /// No delay anywhere.
    pub fn none() -> WanDelays {
        WanDelays::default()
    }

    /// Sets the one-way delay between `a` and `b` (both directions).
    pub fn set(&mut self, a: &str, b: &str, delay: Duration) -> &mut WanDelays {
        self.pairs.insert(pair(a, b), delay);
        self
    }

    /// Builder form of [`set`](Self::set).
    pub fn with(mut self, a: &str, b: &str, delay: Duration) -> WanDelays {
        self.set(a, b, delay);
        self
    }

    /// The one-way delay between `a` and `b`: zero within a region and for a
    /// pair not given.
    pub fn get(&self, a: &str, b: &str) -> Duration {
        if a == b {
            return Duration::ZERO;
        }
        self.pairs.get(&pair(a, b)).copied().unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Every pair given, `(a, b, delay)` with `a < b`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Duration)> {
        self.pairs
            .iter()
            .map(|((a, b), d)| (a.as_str(), b.as_str(), *d))
    }

    /// Checks that every pair names regions of `regions`.
    pub fn check_regions(&self, regions: &[String]) -> Result<(), String> {
        for (a, b, _) in self.iter() {
            for r in [a, b] {
                if !regions.iter().any(|x| x == r) {
                    return Err(format!(
                        "unknown region {r:?} (the cluster's regions: {})",
                        regions.join(",")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parses `A:B=DELAY[,C:D=DELAY…]` (humantime delays such as `40ms`, `1s`)
    /// against the cluster's `regions`. Blank text means no delays. Errors name
    /// the item and start with `--wan-delay`.
    pub fn parse(text: &str, regions: &[String]) -> Result<WanDelays, String> {
        let err = |m: String| format!("--wan-delay: {m}");
        let mut out = WanDelays::none();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (regions_part, delay) = item.split_once('=').ok_or_else(|| {
                err(format!(
                    "{item:?} is not REGION:REGION=DELAY (e.g. us-east:eu-west=40ms)"
                ))
            })?;
            let (a, b) = regions_part.split_once(':').ok_or_else(|| {
                err(format!(
                    "{item:?}: {regions_part:?} is not REGION:REGION (e.g. us-east:eu-west)"
                ))
            })?;
            let (a, b) = (a.trim(), b.trim());
            for r in [a, b] {
                if !regions.iter().any(|x| x == r) {
                    return Err(err(format!(
                        "{item:?}: unknown region {r:?} (the cluster's regions: {})",
                        regions.join(",")
                    )));
                }
            }
            if a == b {
                return Err(err(format!(
                    "{item:?}: a delay needs two different regions (within a region there is none)"
                )));
            }
            let delay = humantime::parse_duration(delay.trim()).map_err(|e| {
                err(format!(
                    "{item:?}: {:?} is not a duration: {e}",
                    delay.trim()
                ))
            })?;
            if out.pairs.contains_key(&pair(a, b)) {
                return Err(err(format!("{item:?}: the pair {a}:{b} is given twice")));
            }
            out.set(a, b, delay);
        }
        Ok(out)
    }
}

impl std::fmt::Display for WanDelays {
    /// The `--wan-delay` syntax (`a:b=40ms,…`); empty when there is no delay.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self
            .iter()
            .map(|(a, b, d)| format!("{a}:{b}={}", humantime::format_duration(d)))
            .collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn regions() -> Vec<String> {
        ["us-east", "us-west", "eu-west"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn parses_the_documented_example_symmetrically() {
        let d = WanDelays::parse(
            "us-east:eu-west=40ms,us-east:us-west=35ms, us-west:eu-west=70ms",
            &regions(),
        )
        .unwrap();
        let ms = Duration::from_millis;
        assert_eq!(d.get("us-east", "eu-west"), ms(40));
        assert_eq!(d.get("eu-west", "us-east"), ms(40));
        assert_eq!(d.get("us-west", "us-east"), ms(35));
        assert_eq!(d.get("eu-west", "us-west"), ms(70));
        assert_eq!(d.get("eu-west", "eu-west"), Duration::ZERO);
        assert_eq!(
            d.to_string(),
            "eu-west:us-east=40ms,eu-west:us-west=70ms,us-east:us-west=35ms"
        );
        assert_eq!(WanDelays::parse(&d.to_string(), &regions()).unwrap(), d);
    }

    #[test]
    fn missing_pairs_and_blank_text_have_no_delay() {
        let d = WanDelays::parse("us-east:eu-west=1s 500ms", &regions()).unwrap();
        assert_eq!(d.get("eu-west", "us-east"), Duration::from_millis(1500));
        assert_eq!(d.get("us-west", "eu-west"), Duration::ZERO);
        assert!(WanDelays::parse("", &regions()).unwrap().is_empty());
        assert!(WanDelays::parse(" , ", &regions()).unwrap().is_empty());
        assert_eq!(WanDelays::none().to_string(), "");
    }

    #[test]
    fn errors_name_the_flag_and_the_problem() {
        for (bad, want) in [
            ("us-east:eu-west", "REGION:REGION=DELAY"),
            ("us-east=40ms", "REGION:REGION"),
            ("us-east:ap-south=40ms", "unknown region \"ap-south\""),
            ("us-east:eu-west=forty", "not a duration"),
            ("us-east:us-east=5ms", "two different regions"),
            ("us-east:eu-west=40ms,eu-west:us-east=41ms", "given twice"),
        ] {
            let err = WanDelays::parse(bad, &regions()).unwrap_err();
            assert!(err.starts_with("--wan-delay: "), "{bad}: {err}");
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn regions_are_checked_for_a_programmatic_spec() {
        let d = WanDelays::none().with("us-east", "mars", Duration::from_millis(1));
        assert!(d.check_regions(&regions()).unwrap_err().contains("mars"));
        let d = WanDelays::none().with("us-east", "eu-west", Duration::from_millis(1));
        d.check_regions(&regions()).unwrap();
    }
}
