//! The command line: `serve`, `migrate`, and the operator commands for
//! organisations, keys and credits (which print a new key exactly once).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::auth::keys::{self, NewKey};
use crate::auth::KeyPolicy;
use crate::billing::{self, IdempotencyKey};
use crate::config::Config;
use crate::db::Db;
use crate::domain::{Credits, OrgId, Plan, Scopes};

#[derive(Debug, Parser)]
#[command(name = "voxgate", version, about = "AI voice agents on the phone")]
pub struct Cli {
    /// Configuration file (missing is fine: defaults and environment apply).
    #[arg(long, global = true, default_value = "voxgate.toml", env = "VOXGATE_CONFIG")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (migrates the database first).
    Serve {
        /// Listen address, e.g. 127.0.0.1:8080 (port 0 picks a free one).
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
    },
    /// Bring the database schema up to date and exit.
    Migrate,
    /// Manage organisations (they own credits, keys, agents, calls and jobs).
    #[command(alias = "accounts")]
    Orgs {
        #[command(subcommand)]
        command: OrgsCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage credits.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Create an organisation and print its id.
    Create {
        #[arg(long, default_value = "default")]
        name: String,
        /// free, creator, pro or enterprise.
        #[arg(long, default_value = "enterprise")]
        plan: String,
        /// Opening balance.
        #[arg(long, default_value_t = 0)]
        credits: u64,
    },
    /// List organisations.
    List,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key of an organisation and print it (shown once; its
    /// id, the app id of the token exchange, goes to stderr).
    Create {
        /// The organisation's id.
        #[arg(long, alias = "account")]
        org: String,
        #[arg(long, default_value = "default")]
        name: String,
        /// Comma-separated scopes: *, agents, calls, generate, jobs, keys, settings, usage.
        #[arg(long, default_value = "*")]
        scopes: String,
        /// The member of the organisation who holds the key.
        #[arg(long)]
        member: Option<String>,
        /// Client networks the key is accepted from (CIDR or address; repeat or comma-separate).
        #[arg(long = "ip", value_delimiter = ',')]
        ips: Vec<String>,
        /// Models the key may use (repeat or comma-separate); default: all.
        #[arg(long = "models", value_delimiter = ',')]
        models: Vec<String>,
        /// Credits the key may spend per UTC day.
        #[arg(long)]
        daily_cap: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add credits to an account (a ledger grant).
    Grant {
        account: String,
        amount: u64,
        /// Makes the grant happen once even if the command is repeated.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(&cli.config)?;
    if let Command::Serve { bind: Some(bind) } = &cli.command {
        config.bind = *bind;
    }
    crate::telemetry::init(&config.log);
    match cli.command {
        Command::Serve { .. } => crate::server::serve(config).await,
        Command::Migrate => {
            Db::open(&config.database_url, 1).await?;
            println!("database is up to date");
            Ok(())
        }
        Command::Orgs { command } => {
            let db = Db::open(&config.database_url, 2).await?;
            match command {
                OrgsCommand::Create { name, plan, credits } => {
                    let plan: Plan = plan.parse()?;
                    let org = crate::orgs::create(&db, &name, plan, Credits::new(credits)).await?;
                    println!("{}", org.id);
                    eprintln!("created organisation '{}' on the {} plan with {} credits", org.name, org.plan, org.credits);
                }
                OrgsCommand::List => {
                    for a in crate::orgs::list(&db).await? {
                        println!("{}\t{}\t{}\t{}", a.id, a.plan, a.credits, a.name);
                    }
                }
            }
            Ok(())
        }
        Command::Keys { command: KeysCommand::Create { org, name, scopes, member, ips, models, daily_cap } } => {
            let db = Db::open(&config.database_url, 2).await?;
            let org: OrgId = org.parse()?;
            let policy = KeyPolicy {
                allowed_models: (!models.is_empty()).then_some(models),
                ip_allowlist: if ips.is_empty() {
                    None
                } else {
                    Some(ips.iter().map(|s| KeyPolicy::parse_network(s)).collect::<crate::Result<_>>()?)
                },
                daily_credit_cap: daily_cap.map(Credits::new),
            };
            let new = NewKey { name, scopes: Scopes::parse_list(&scopes)?, member, policy };
            let (info, secret) = keys::create(&db, org, new).await?;
            println!("{}", secret.expose());
            eprintln!("created key {} ({}) with scopes [{}]; it is shown only once", info.id, info.prefix, info.scopes.to_db());
            Ok(())
        }
        Command::Credits { command: CreditsCommand::Grant { account, amount, idempotency_key } } => {
            let db = Db::open(&config.database_url, 2).await?;
            let account: OrgId = account.parse()?;
            let key = idempotency_key.unwrap_or_else(|| format!("cli-grant:{}", uuid::Uuid::new_v4()));
            let balance = billing::grant(&db, account, Credits::new(amount), &IdempotencyKey::parse(&key)?).await?;
            println!("{balance}");
            Ok(())
        }
    }
}
