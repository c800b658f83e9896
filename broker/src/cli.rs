//! The operator command line: `umbra shadow ...`, `umbra fleet` and `umbra changes`, talking
//! to a running server's HTTP API, and `umbra passwd`, which edits a
//! password file.

use std::io::{BufRead, BufReader, Read, Write};

use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the API is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Base URL of a running umbra's HTTP API.
    #[arg(
        long,
        env = "UMBRA_API",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api: String,
    /// Bearer token (a `read` token for reads, `write` for changes).
    #[arg(long, env = "UMBRA_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON as it is instead of a readable form.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Shadow operations.
#[derive(Debug, Subcommand)]
pub enum ShadowCommand {
    /// Print a thing's shadow.
    Get {
        thing: String,
        /// A named shadow (the classic shadow when absent).
        #[arg(long)]
        name: Option<String>,
    },
    /// Update a shadow with a document such as '{"state":{"desired":{"on":true}}}' ('-' reads stdin).
    Update {
        thing: String,
        document: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a shadow.
    Delete {
        thing: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List the fleet (things with a shadow), or the named shadows of one thing.
    List {
        thing: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Search the fleet, e.g. 'shadow.reported.temp>30 AND connectivity.connected:true'.
    Search {
        query: String,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// `umbra thing ...`.
#[derive(Debug, Subcommand)]
pub enum ThingCommand {
    /// Delete a thing: all its shadows and its connectivity.
    Delete { thing: String },
}

/// Paging of `shadow list` and `shadow search`.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Go on from where a previous page ended (its "more:" line says).
    #[arg(long)]
    pub next_token: Option<String>,
    /// At most this many per page (the server's default when absent).
    #[arg(long)]
    pub page_size: Option<u32>,
    /// Every page, one after the other.
    #[arg(long, conflicts_with = "next_token")]
    pub all: bool,
}

/// Options of `umbra changes`.
#[derive(Debug, Args)]
pub struct ChangesArgs {
    /// Keep printing changes as they are committed.
    #[arg(long)]
    pub follow: bool,
    /// Start after this change sequence.
    #[arg(long)]
    pub since: Option<u64>,
    /// Only changes of this thing.
    #[arg(long)]
    pub thing: Option<String>,
    /// Only changes matching this search query.
    #[arg(long)]
    pub q: Option<String>,
}

/// `umbra passwd FILE NAME`: sets (or with `-D` removes) a device's password.
#[derive(Debug, Clone, Args)]
pub struct PasswdArgs {
    /// The password file (`[mqtt] password_file`); created if missing.
    pub file: std::path::PathBuf,
    /// The user name: the device's thing name (its client id).
    pub name: String,
    /// Read the password from the first line of standard input instead of
    /// prompting for it.
    #[arg(long, conflicts_with = "delete")]
    pub stdin: bool,
    /// Remove the user instead.
    #[arg(short = 'D', long)]
    pub delete: bool,
}

/// `umbra certs`: a development CA and certificates signed by it.
#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// Make ca.pem and ca.key in DIR (the listener's client_ca is ca.pem).
    Ca { dir: std::path::PathBuf },
    /// Make server.pem and server.key in DIR for the listener, valid for HOSTs.
    Server {
        dir: std::path::PathBuf,
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Make NAME.pem and NAME.key in DIR: a device certificate whose subject
    /// common name, NAME, is the device's identity (its thing name).
    Device {
        dir: std::path::PathBuf,
        name: String,
    },
    /// Make DIR/crl.pem: a revocation list signed by the CA that revokes
    /// every SERIAL (hex, as `certs device` prints it), for
    /// `[mqtt] revoked_certificates`. List every revoked serial each time.
    Crl {
        dir: std::path::PathBuf,
        serials: Vec<String>,
        /// Days until the list's next update is due.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Certs(#[from] crate::certs::CertError),
    #[error(transparent)]
    PasswordFile(#[from] crate::auth::PasswordFileError),
    #[error("{0}")]
    Usage(String),
    #[error("{status}: {body}")]
    Api { status: u16, body: String },
    #[error("cannot reach {url}: {source}")]
    Transport {
        url: String,
        source: Box<ureq::Transport>,
    },
    #[error("reading the response: {0}")]
    Io(#[from] std::io::Error),
    #[error("the document is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the server ended the stream: {0}")]
    StreamEnded(String),
}

struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn new(args: &ApiArgs) -> Api {
        Api {
            base: args.api.trim_end_matches('/').to_string(),
            token: args.token.clone(),
            agent: ureq::AgentBuilder::new().build(),
        }
    }

    fn request(&self, method: &str, path: &str, query: &[(&str, &str)]) -> ureq::Request {
        let mut request = self.agent.request(method, &format!("{}{path}", self.base));
        for (k, v) in query {
            request = request.query(k, v);
        }
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        request
    }

    fn call(&self, request: ureq::Request, body: Option<&str>) -> Result<ureq::Response, CliError> {
        let url = request.url().to_string();
        let result = match body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_string(body),
            None => request.call(),
        };
        match result {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => Err(CliError::Api {
                status,
                body: response.into_string().unwrap_or_default(),
            }),
            Err(ureq::Error::Transport(source)) => Err(CliError::Transport {
                url,
                source: Box::new(source),
            }),
        }
    }

    fn json(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Value, CliError> {
        let response = self.call(self.request(method, path, query), body)?;
        Ok(serde_json::from_reader(response.into_reader())?)
    }

    /// A page of `path` as `page` asks (`nextToken`, `pageSize`), or with
    /// `--all` every page, their `items` arrays joined into one answer.
    fn pages(
        &self,
        path: &str,
        query: &[(&str, &str)],
        page: &PageArgs,
        items: &str,
    ) -> Result<Value, CliError> {
        let size = page.page_size.map(|s| s.to_string());
        let mut next = page.next_token.clone();
        let mut all: Vec<Value> = Vec::new();
        loop {
            let mut query = query.to_vec();
            if let Some(size) = &size {
                query.push(("pageSize", size));
            }
            if let Some(next) = &next {
                query.push(("nextToken", next));
            }
            let mut value = self.json("GET", path, &query, None)?;
            if !page.all {
                return Ok(value);
            }
            if let Some(found) = value.get_mut(items).and_then(Value::as_array_mut) {
                all.append(found);
            }
            match value["nextToken"].as_str() {
                Some(token) => next = Some(token.to_owned()),
                None => {
                    value[items] = Value::Array(all);
                    return Ok(value);
                }
            }
        }
    }
}

fn name_query(name: &Option<String>) -> Vec<(&str, &str)> {
    name.as_deref()
        .map(|n| vec![("name", n)])
        .unwrap_or_default()
}

/// Runs one shadow command, writing its result to `out`.
pub fn run_shadow(
    args: &ApiArgs,
    command: &ShadowCommand,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let api = Api::new(args);
    let value = match command {
        ShadowCommand::Get { thing, name } => api.json(
            "GET",
            &format!("/things/{thing}/shadow"),
            &name_query(name),
            None,
        )?,
        ShadowCommand::Update {
            thing,
            document,
            name,
        } => {
            let document = if document == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                text
            } else {
                document.clone()
            };
            // Refuse locally what is not JSON, with the parser's position.
            serde_json::from_str::<Value>(&document)?;
            api.json(
                "POST",
                &format!("/things/{thing}/shadow"),
                &name_query(name),
                Some(&document),
            )?
        }
        ShadowCommand::Delete { thing, name } => api.json(
            "DELETE",
            &format!("/things/{thing}/shadow"),
            &name_query(name),
            None,
        )?,
        ShadowCommand::List { thing, page } => {
            let path = match thing {
                Some(thing) => format!("/api/things/shadow/ListNamedShadowsForThing/{thing}"),
                None => "/v1/things".to_owned(),
            };
            let items = if thing.is_some() { "results" } else { "things" };
            api.pages(&path, &[], page, items)?
        }
        ShadowCommand::Search { query, page } => {
            api.pages("/v1/search", &[("q", query)], page, "things")?
        }
    };
    if args.json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let again = |next: &str| {
        let command = match command {
            ShadowCommand::List {
                thing: Some(thing), ..
            } => format!("shadow list {thing}"),
            ShadowCommand::Search { query, .. } => format!("shadow search '{query}'"),
            _ => "shadow list".to_owned(),
        };
        format!("(more: umbra {command} --next-token {next}, or --all)")
    };
    match command {
        ShadowCommand::List { thing: None, .. } => {
            let rows = value["things"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|thing| {
                    let shadows: Vec<String> = thing["shadows"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| {
                            let name = s["name"].as_str().unwrap_or("(classic)");
                            format!("{name}@{}", s["version"])
                        })
                        .collect();
                    vec![
                        text(&thing["thingName"]),
                        connected(&thing["connectivity"]),
                        shadows.join(" "),
                    ]
                });
            table(out, &["thing", "connected", "shadows (name@version)"], rows)?;
        }
        ShadowCommand::List { thing: Some(_), .. } => {
            for name in value["results"].as_array().into_iter().flatten() {
                writeln!(out, "{}", text(name))?;
            }
        }
        ShadowCommand::Search { .. } => {
            let rows = value["things"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|thing| {
                    let shadow = &thing["shadow"];
                    let delta = match shadow["hasDelta"].as_bool() {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "-",
                    };
                    vec![
                        text(&thing["thingName"]),
                        connected(&thing["connectivity"]),
                        shadow["version"]
                            .as_u64()
                            .map_or("-".into(), |v| v.to_string()),
                        delta.to_owned(),
                        shadow.get("reported").map_or("-".into(), Value::to_string),
                    ]
                });
            let header = ["thing", "connected", "version", "delta", "reported"];
            table(out, &header, rows)?;
        }
        _ => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
    }
    if let Some(next) = value["nextToken"].as_str() {
        writeln!(out, "{}", again(next))?;
    }
    Ok(())
}

/// Runs one thing command, writing what it did to `out`.
pub fn run_thing(
    args: &ApiArgs,
    command: &ThingCommand,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let ThingCommand::Delete { thing } = command;
    let value = Api::new(args).json("DELETE", &format!("/v1/things/{thing}"), &[], None)?;
    if args.json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let shadows: Vec<String> = value["shadows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|name| name.as_str().unwrap_or("(classic)").to_owned())
        .collect();
    let connectivity = match value["connectivity"].as_bool() {
        Some(true) => "and its connectivity",
        _ => "(no connectivity known)",
    };
    let shadows = match shadows.is_empty() {
        true => "no shadows".to_owned(),
        false => format!("shadows {}", shadows.join(", ")),
    };
    writeln!(out, "deleted {thing}: {shadows} {connectivity}")?;
    Ok(())
}

/// `umbra fleet`: the fleet at a glance (`GET /v1/fleet`).
pub fn run_fleet(args: &ApiArgs, out: &mut impl Write) -> Result<(), CliError> {
    let value = Api::new(args).json("GET", "/v1/fleet", &[], None)?;
    if args.json {
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let n = |key: &str| value[key].as_u64().unwrap_or(0);
    writeln!(out, "things     {}", n("things"))?;
    writeln!(out, "connected  {}", n("connected"))?;
    writeln!(
        out,
        "shadows    {} ({} in sync, {} with a delta)",
        n("shadows"),
        n("shadowsInSync"),
        n("shadowsWithDelta")
    )?;
    Ok(())
}

/// A JSON string as text (other values as JSON).
fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

fn connected(connectivity: &Value) -> String {
    match connectivity["connected"].as_bool() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
    .to_owned()
}

/// Rows under a header, each column as wide as its widest cell.
fn table(
    out: &mut impl Write,
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<(), CliError> {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// Prints the change stream: what is in the log after `--since`, then (with
/// `--follow`) every change as it is committed.
pub fn run_changes(
    args: &ApiArgs,
    changes: &ChangesArgs,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let api = Api::new(args);
    let since = changes.since.map(|s| s.to_string());
    let mut query: Vec<(&str, &str)> =
        vec![("follow", if changes.follow { "true" } else { "false" })];
    if let Some(since) = &since {
        query.push(("since", since));
    }
    if let Some(thing) = &changes.thing {
        query.push(("thing", thing));
    }
    if let Some(q) = &changes.q {
        query.push(("q", q));
    }
    let response = api.call(api.request("GET", "/v1/changes", &query), None)?;
    let reader = BufReader::new(response.into_reader());
    let mut id = String::new();
    let mut event_type = String::new();
    let mut data = String::new();
    for line in reader.lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("id:") {
            id = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("event:") {
            event_type = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("data:") {
            data.push_str(rest.trim_start());
        } else if line.is_empty() && !data.is_empty() {
            if event_type == "end" {
                let end: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if end["reason"] != "caught-up" {
                    return Err(CliError::StreamEnded(
                        end["reason"].as_str().unwrap_or("?").to_string(),
                    ));
                }
                break;
            }
            if args.json {
                writeln!(out, "{data}")?;
            } else {
                let event: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let thing = event["thing"].as_str().unwrap_or("?");
                let name = event["name"]
                    .as_str()
                    .map(|n| format!("/{n}"))
                    .unwrap_or_default();
                let kind = event["kind"].as_str().unwrap_or("?");
                writeln!(
                    out,
                    "{id:>8} {kind:<10} {thing}{name} v{}",
                    event["version"]
                )?;
            }
            out.flush()?;
            data.clear();
            event_type.clear();
        }
    }
    Ok(())
}

/// Runs `umbra certs`.
pub fn run_certs(command: &CertsCommand, out: &mut impl Write) -> Result<(), CliError> {
    use crate::certs;
    match command {
        CertsCommand::Ca { dir } => {
            let path = certs::make_ca(dir)?;
            writeln!(
                out,
                "wrote {} and its key (set it as a TLS listener's client_ca)",
                path.display()
            )?;
        }
        CertsCommand::Server { dir, hosts } => {
            let path = certs::make_server(dir, hosts)?;
            writeln!(
                out,
                "wrote {} and its key, for {}",
                path.display(),
                hosts.join(", ")
            )?;
        }
        CertsCommand::Device { dir, name } => {
            let (path, serial) = certs::make_device(dir, name)?;
            writeln!(
                out,
                "wrote {} and its key (serial {serial})",
                path.display()
            )?;
        }
        CertsCommand::Crl { dir, serials, days } => {
            let path = certs::make_crl(dir, serials, *days)?;
            writeln!(
                out,
                "wrote {}, revoking {} certificate(s)",
                path.display(),
                serials.len()
            )?;
        }
    }
    Ok(())
}

/// Runs `umbra passwd`: the password comes from `input`'s first line with
/// `--stdin`, else from two no-echo prompts on the terminal.
pub fn run_passwd(
    args: &PasswdArgs,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> Result<(), CliError> {
    use crate::auth::PasswordFile;
    let file = args.file.display();
    if args.delete {
        if !PasswordFile::remove(&args.file, &args.name)? {
            return Err(CliError::Usage(format!("{} is not in {file}", args.name)));
        }
        writeln!(out, "removed {} from {file}", args.name)?;
        return Ok(());
    }
    let password = if args.stdin {
        let mut line = String::new();
        input.read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        let no_terminal = |e: std::io::Error| {
            CliError::Usage(format!("cannot prompt for the password ({e}); use --stdin"))
        };
        let first = rpassword::prompt_password(format!("password for {}: ", args.name))
            .map_err(no_terminal)?;
        let again = rpassword::prompt_password("again: ").map_err(no_terminal)?;
        if first != again {
            return Err(CliError::Usage("the two passwords differ".into()));
        }
        first
    };
    if password.is_empty() {
        return Err(CliError::Usage("the password is empty".into()));
    }
    PasswordFile::set(&args.file, &args.name, &password, argon2::Params::default())?;
    writeln!(
        out,
        "set {} in {file}; a running umbra with this password_file takes it within seconds (or on SIGHUP)",
        args.name
    )?;
    Ok(())
}
