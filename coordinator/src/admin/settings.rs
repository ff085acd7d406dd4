//! Changing the dynamic [`ClusterConfig`] by key: `meridianctl config set
//! KEY=VALUE` and the `SetConfig` RPC. Pure: takes the current config and the
//! settings, returns the validated new one or an error naming the key.
//!
//! Values are text and are read according to the field's type: numbers,
//! `true`/`false`, durations in humantime (`500ms`, `10s`), the sync mode by
//! name, lists as comma-separated names (or a JSON array).

use meridian_shared::records::ClusterConfig;
use serde_json::Value;

/// A setting could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("unknown config key `{key}` (known: {known})")]
    UnknownKey { key: String, known: String },
    #[error("invalid value {value:?} for config key `{key}`: {message}")]
    InvalidValue {
        key: String,
        value: String,
        message: String,
    },
    #[error("invalid cluster config JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Invalid(String),
}

/// Splits `KEY=VALUE` (the value may contain `=`; surrounding spaces are trimmed).
pub fn parse_assignment(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("expected KEY=VALUE, got {text:?} (empty key)"));
    }
    Ok((key.to_string(), value.trim().to_string()))
}

/// The keys of [`ClusterConfig`], in declaration order.
pub fn known_keys() -> Vec<String> {
    match serde_json::to_value(ClusterConfig::default()) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Applies `settings` to `current` in order and validates the result.
pub fn apply_settings(
    current: &ClusterConfig,
    settings: &[(String, String)],
) -> Result<ClusterConfig, SettingError> {
    let mut doc = match serde_json::to_value(current) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(SettingError::Json("config is not an object".into())),
        Err(e) => return Err(SettingError::Json(e.to_string())),
    };
    for (key, value) in settings {
        let Some(old) = doc.get(key) else {
            return Err(SettingError::UnknownKey {
                key: key.clone(),
                known: known_keys().join(", "),
            });
        };
        let new = typed_value(old, value).map_err(|message| SettingError::InvalidValue {
            key: key.clone(),
            value: value.clone(),
            message,
        })?;
        doc.insert(key.clone(), new);
        // Check each key on its own so the error names the one that is wrong.
        serde_json::from_value::<ClusterConfig>(Value::Object(doc.clone())).map_err(|e| {
            SettingError::InvalidValue {
                key: key.clone(),
                value: value.clone(),
                message: e.to_string(),
            }
        })?;
    }
    let config: ClusterConfig = serde_json::from_value(Value::Object(doc))
        .map_err(|e| SettingError::Json(e.to_string()))?;
    config
        .validate()
        .map_err(|e| SettingError::Invalid(e.to_string()))?;
    Ok(config)
}

/// Parses and validates a whole config given as JSON; unknown keys are refused.
pub fn parse_config_json(json: &str) -> Result<ClusterConfig, SettingError> {
    let value: Value = serde_json::from_str(json).map_err(|e| SettingError::Json(e.to_string()))?;
    let Value::Object(map) = &value else {
        return Err(SettingError::Json("expected a JSON object".into()));
    };
    let known = known_keys();
    if let Some(key) = map.keys().find(|k| !known.contains(k)) {
        return Err(SettingError::UnknownKey {
            key: key.clone(),
            known: known.join(", "),
        });
    }
    let config: ClusterConfig =
        serde_json::from_value(value).map_err(|e| SettingError::Json(e.to_string()))?;
    config
        .validate()
        .map_err(|e| SettingError::Invalid(e.to_string()))?;
    Ok(config)
}

/// Reads `text` as a value of the same JSON type as `old`.
fn typed_value(old: &Value, text: &str) -> Result<Value, String> {
    match old {
        Value::Bool(_) => match text.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Ok(Value::Bool(true)),
            "false" | "off" | "no" | "0" => Ok(Value::Bool(false)),
            _ => Err("expected true or false".into()),
        },
        Value::Number(_) => text
            .replace('_', "")
            .parse::<u64>()
            .map(Value::from)
            .map_err(|e| format!("expected a non-negative integer: {e}")),
        Value::Array(_) => {
            if text.starts_with('[') {
                serde_json::from_str::<Vec<String>>(text)
                    .map(Value::from)
                    .map_err(|e| format!("expected a JSON array of strings: {e}"))
            } else {
                Ok(Value::from(
                    text.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ))
            }
        }
        _ => Ok(Value::String(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_shared::records::SyncMode;
    use std::time::Duration;

    fn set(pairs: &[(&str, &str)]) -> Result<ClusterConfig, SettingError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        apply_settings(&ClusterConfig::default(), &pairs)
    }

    #[test]
    fn assignment_parsing() {
        assert_eq!(
            parse_assignment("paused=true").unwrap(),
            ("paused".into(), "true".into())
        );
        assert_eq!(
            parse_assignment(" failover_hold = 5s ").unwrap(),
            ("failover_hold".into(), "5s".into())
        );
        assert_eq!(
            parse_assignment("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_assignment("paused").is_err());
        assert!(parse_assignment("=1").is_err());
    }

    #[test]
    fn values_follow_the_field_types() {
        let cfg = set(&[
            ("sync_mode", "strict"),
            ("max_failover_lag", "2_000"),
            ("failover_hold", "3s"),
            ("paused", "yes"),
            ("region_priority", "us-east, eu-west"),
            ("suspect_after", "1s 500ms"),
        ])
        .unwrap();
        assert_eq!(cfg.sync_mode, SyncMode::Strict);
        assert_eq!(cfg.max_failover_lag, 2000);
        assert_eq!(cfg.failover_hold, Duration::from_secs(3));
        assert!(cfg.paused);
        assert_eq!(cfg.region_priority, vec!["us-east", "eu-west"]);
        assert_eq!(cfg.suspect_after, Duration::from_millis(1500));
        let cfg = set(&[("region_priority", r#"["a"]"#)]).unwrap();
        assert_eq!(cfg.region_priority, vec!["a"]);
        assert!(set(&[("region_priority", "")])
            .unwrap()
            .region_priority
            .is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let err = set(&[("pasued", "true")]).unwrap_err().to_string();
        assert!(err.contains("`pasued`") && err.contains("paused"), "{err}");
        for (key, value) in [
            ("max_failover_lag", "-1"),
            ("paused", "maybe"),
            ("failover_hold", "soon"),
            ("sync_mode", "sometimes"),
        ] {
            let err = set(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
        // Validation of the whole config names the key too.
        let err = set(&[("suspect_after", "100ms")]).unwrap_err().to_string();
        assert!(err.contains("suspect_after"), "{err}");
    }

    #[test]
    fn whole_json_configs() {
        let cfg = parse_config_json(r#"{"paused": true, "failover_hold": "2s"}"#).unwrap();
        assert!(cfg.paused);
        assert_eq!(cfg.failover_hold, Duration::from_secs(2));
        assert_eq!(
            cfg.max_failover_lag,
            ClusterConfig::default().max_failover_lag
        );
        let err = parse_config_json(r#"{"pause": true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`pause`"), "{err}");
        assert!(parse_config_json("[1]").is_err());
        assert!(known_keys().contains(&"paused".to_string()));
    }
}
