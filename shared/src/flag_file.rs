//! A TOML file of command-line settings, for daemons configured by flags
//! (`meridian-agent`, `meridian-coordinator`): `--config FILE` (or its
//! environment variable) names a file whose keys are the long flag names and
//! whose values are what the flag would take, e.g.
//!
//! ```toml
//! name = "us-east-1"
//! region = "us-east"
//! etcd = ["http://etcd-1:2379", "http://etcd-2:2379"]
//! data-dir = "/var/lib/meridian/data"
//! pg-port = 5432
//! bootstrap = true
//! ```
//!
//! Precedence: a flag on the command line, then its environment variable, then
//! the file, then the flag's default. The file is turned into flags placed
//! before the command line's, for the settings given neither on the command
//! line nor in the environment, so clap validates and converts every value as
//! it does a flag's. A key that names no flag, a table, or a non-boolean value
//! for an on/off flag is an error naming the file and the key.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, CommandFactory, Parser};

/// The id of the argument that names the file.
const CONFIG_ID: &str = "config";

/// Parses the process's command line for `P`, with the settings of the file
/// named by its `config` argument (if any) underneath. Exits like
/// `P::parse()` on a usage error, and with status 2 and a message naming the
/// key on a bad file.
pub fn parse<P: Parser>() -> P {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match expand::<P>(argv, |name| std::env::var_os(name)) {
        Ok(argv) => P::parse_from(argv),
        Err(e) => {
            let bin = P::command().get_name().to_owned();
            eprintln!("{bin}: {e}");
            std::process::exit(2);
        }
    }
}

/// The command line with the file's settings inserted as flags after the
/// program name (`env` reads environment variables). Unchanged when no file
/// is named.
pub fn expand<P: CommandFactory>(
    argv: Vec<OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<OsString>, String> {
    let cmd = P::command();
    let config_arg = cmd
        .get_arguments()
        .find(|a| a.get_id() == CONFIG_ID)
        .ok_or_else(|| format!("{} has no --{CONFIG_ID} setting", cmd.get_name()))?;
    let Some(path) = config_path(&argv, config_arg, &env) else {
        return Ok(argv);
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("--config {}: {e}", path.display()))?;
    let mut inserted = Vec::new();
    for (key, value) in &table {
        let err = |m: &str| format!("--config {}: key `{key}`: {m}", path.display());
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && a.get_id() != CONFIG_ID)
            .ok_or_else(|| err("no such setting (keys are the long flag names, see --help)"))?;
        if given_on_command_line(&argv, key) || arg_env_is_set(arg, &env) {
            continue;
        }
        inserted.extend(flags_for(key, arg, value).map_err(|m| err(&m))?);
    }
    let mut out = Vec::with_capacity(argv.len() + inserted.len());
    let mut rest = argv.into_iter();
    out.extend(rest.next());
    out.extend(inserted);
    out.extend(rest);
    Ok(out)
}

/// `--config FILE` / `--config=FILE` on the command line, else the config
/// argument's environment variable.
fn config_path(
    argv: &[OsString],
    config_arg: &Arg,
    env: &impl Fn(&str) -> Option<OsString>,
) -> Option<PathBuf> {
    let long = format!("--{CONFIG_ID}");
    let prefix = format!("--{CONFIG_ID}=");
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == long {
            return args.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix(&prefix) {
            return Some(PathBuf::from(v));
        }
    }
    let var = config_arg.get_env()?.to_str()?;
    env(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn given_on_command_line(argv: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    let with_value = format!("--{long}=");
    argv.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&with_value)
    })
}

fn arg_env_is_set(arg: &Arg, env: &impl Fn(&str) -> Option<OsString>) -> bool {
    arg.get_env()
        .and_then(|v| v.to_str())
        .is_some_and(|name| env(name).is_some())
}

/// The flags that say what `value` says for `arg`.
fn flags_for(long: &str, arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let flag = OsString::from(format!("--{long}"));
    if !arg.get_action().takes_values() {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![flag]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            _ => Err("an on/off setting: expected true or false".into()),
        };
    }
    let items: Vec<&toml::Value> = match value {
        toml::Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut out = Vec::with_capacity(items.len() * 2);
    for item in items {
        let text = match item {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                return Err("expected a value or a list of values".into())
            }
        };
        out.push(flag.clone());
        out.push(OsString::from(text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    #[derive(Debug, Parser)]
    #[command(name = "t")]
    struct Args {
        #[arg(long, env = "T_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "T_NAME")]
        name: String,
        #[arg(long, env = "T_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        #[arg(long, env = "T_PORT", default_value_t = 5432)]
        port: u16,
        #[arg(long)]
        bootstrap: bool,
        #[arg(long, env = "T_TTL", default_value = "3s")]
        ttl: humantime::Duration,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn parse_with(argv: &[&str], env: &[(&str, &str)]) -> Result<Args, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = argv.iter().map(OsString::from).collect();
        let expanded = expand::<Args>(argv, |k| env.get(k).map(OsString::from))?;
        Args::try_parse_from(expanded).map_err(|e| e.to_string())
    }

    #[test]
    fn the_file_fills_what_flags_and_environment_leave_unset() {
        let f = file(
            "name = \"from-file\"\netcd = [\"http://a:1\", \"http://b:2\"]\nport = 6000\n\
             bootstrap = true\nttl = \"5s\"\n",
        );
        let path = f.path().to_str().unwrap();
        let a = parse_with(&["t", "--config", path], &[]).unwrap();
        assert_eq!(a.name, "from-file");
        assert_eq!(a.etcd, ["http://a:1", "http://b:2"]);
        assert_eq!((a.port, a.bootstrap), (6000, true));
        assert_eq!(*a.ttl, std::time::Duration::from_secs(5));

        // A flag beats the environment, which beats the file: the file adds
        // nothing for a setting given either way (clap then reads the
        // environment itself, so the expanded command line is checked here).
        let env: HashMap<&str, &str> = [("T_PORT", "6500"), ("T_NAME", "from-env")].into();
        let expanded = expand::<Args>(
            ["t", &format!("--config={path}"), "--port", "7000"]
                .iter()
                .map(OsString::from)
                .collect(),
            |k| env.get(k).map(OsString::from),
        )
        .unwrap();
        let text: Vec<String> = expanded
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!text.iter().any(|a| a == "--name"), "{text:?}");
        assert_eq!(
            text.iter().filter(|a| *a == "--port").count(),
            1,
            "{text:?}"
        );
        assert!(
            text.ends_with(&["--port".to_owned(), "7000".to_owned()]),
            "{text:?}"
        );
        assert_eq!(
            text.iter().filter(|a| *a == "--etcd").count(),
            2,
            "{text:?}"
        );

        // The file may be named by the environment too.
        let a = parse_with(&["t"], &[("T_CONFIG", path)]).unwrap();
        assert_eq!(a.name, "from-file");

        // Without a file nothing changes.
        let a = parse_with(&["t", "--name", "n", "--etcd", "http://x:1"], &[]).unwrap();
        assert_eq!((a.name.as_str(), a.port, a.bootstrap), ("n", 5432, false));
    }

    #[test]
    fn bad_files_name_the_file_and_the_key() {
        let cases = [
            ("nme = \"x\"\n", "key `nme`: no such setting"),
            (
                "bootstrap = \"yes\"\n",
                "key `bootstrap`: an on/off setting",
            ),
            ("etcd = [[\"a\"]]\n", "key `etcd`: expected a value"),
            ("[name]\nx = 1\n", "key `name`: expected a value"),
            ("config = \"other.toml\"\n", "key `config`: no such setting"),
            ("name = \n", "--config "),
        ];
        for (text, want) in cases {
            let f = file(text);
            let path = f.path().to_str().unwrap().to_owned();
            let err = parse_with(&["t", "--config", &path], &[]).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(
                err.contains(&path) || want == "--config ",
                "{text:?}: {err}"
            );
        }
        let err = parse_with(&["t", "--config", "/nonexistent/meridian.toml"], &[]).unwrap_err();
        assert!(err.contains("/nonexistent/meridian.toml"), "{err}");
        // A value clap rejects is reported by clap, naming the flag.
        let f = file("name = \"n\"\netcd = \"http://a:1\"\nport = 70000\n");
        let err = parse_with(&["t", "--config", f.path().to_str().unwrap()], &[]).unwrap_err();
        assert!(err.contains("--port"), "{err}");
    }
}
