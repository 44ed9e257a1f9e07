//! The command line: `serve`, `migrate`, and the operator commands for
//! accounts, keys and credits (which print a new key exactly once).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::auth::keys;
use crate::billing::{self, IdempotencyKey};
use crate::config::Config;
use crate::db::Db;
use crate::domain::{AccountId, Credits, Plan, Scopes};

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
    /// Manage accounts.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
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
pub enum AccountsCommand {
    /// Create an account and print its id.
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
    /// List accounts.
    List,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key and print it (shown once).
    Create {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "default")]
        name: String,
        /// Comma-separated scopes: *, agents, calls, generate, jobs, keys, settings, usage.
        #[arg(long, default_value = "*")]
        scopes: String,
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
        Command::Accounts { command } => {
            let db = Db::open(&config.database_url, 2).await?;
            match command {
                AccountsCommand::Create { name, plan, credits } => {
                    let plan: Plan = plan.parse()?;
                    let account = crate::accounts::create(&db, &name, plan, Credits::new(credits)).await?;
                    println!("{}", account.id);
                    eprintln!("created account '{}' on the {} plan with {} credits", account.name, account.plan, account.credits);
                }
                AccountsCommand::List => {
                    for a in crate::accounts::list(&db).await? {
                        println!("{}\t{}\t{}\t{}", a.id, a.plan, a.credits, a.name);
                    }
                }
            }
            Ok(())
        }
        Command::Keys { command: KeysCommand::Create { account, name, scopes } } => {
            let db = Db::open(&config.database_url, 2).await?;
            let account: AccountId = account.parse()?;
            let scopes = Scopes::parse_list(&scopes)?;
            let (info, secret) = keys::create(&db, account, &name, &scopes).await?;
            println!("{}", secret.expose());
            eprintln!("created key {} ({}) with scopes [{}]; it is shown only once", info.id, info.prefix, info.scopes.to_db());
            Ok(())
        }
        Command::Credits { command: CreditsCommand::Grant { account, amount, idempotency_key } } => {
            let db = Db::open(&config.database_url, 2).await?;
            let account: AccountId = account.parse()?;
            let key = idempotency_key.unwrap_or_else(|| format!("cli-grant:{}", uuid::Uuid::new_v4()));
            let balance = billing::grant(&db, account, Credits::new(amount), &IdempotencyKey::parse(&key)?).await?;
            println!("{balance}");
            Ok(())
        }
    }
}
