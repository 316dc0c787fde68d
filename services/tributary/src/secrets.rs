//! `tributary secret set|list|delete`: a project's secrets through the server's `Secrets` API.
//! Values go one way only: from standard input to the server, never back.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use tributary_proto::api::{self, secrets_client::SecretsClient};

use crate::cli::{SecretCommand, ServerArgs};
use crate::client::{channel, status, Svc};

pub async fn command(cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SecretCommand::Set {
            project,
            name,
            server,
        } => {
            let value = read_value(&name)?;
            let info = client(&server)
                .await?
                .set_secret(api::SetSecretRequest {
                    project: project.clone(),
                    name: name.clone(),
                    value,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "secret {} of project {} set at {}; jobs get it with `secrets: [{}]`",
                info.name,
                info.project,
                when(info.set_us),
                info.name
            );
            Ok(ExitCode::SUCCESS)
        }
        SecretCommand::List {
            project,
            json,
            server,
        } => {
            let list = client(&server)
                .await?
                .list_secrets(api::ListSecretsRequest {
                    project: project.clone(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .secrets;
            if json {
                for s in &list {
                    println!(
                        "{}",
                        serde_json::json!({
                            "project": s.project, "name": s.name, "set_us": s.set_us, "who": s.who,
                        })
                    );
                }
            } else if list.is_empty() {
                println!(
                    "project {project} has no secrets; `tributary secret set {project} NAME` \
                     reads one from standard input"
                );
            } else {
                for s in &list {
                    println!("{:<32} set {} by {}", s.name, when(s.set_us), s.who);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SecretCommand::Delete {
            project,
            name,
            server,
        } => {
            client(&server)
                .await?
                .delete_secret(api::DeleteSecretRequest {
                    project: project.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(status)?;
            println!("secret {name} of project {project} deleted");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn client(server: &ServerArgs) -> anyhow::Result<SecretsClient<Svc>> {
    let (ch, auth) = channel(server).await?;
    Ok(SecretsClient::with_interceptor(ch, auth))
}

/// The value from standard input, without one trailing newline.
fn read_value(name: &str) -> anyhow::Result<Vec<u8>> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("type the value of {name}, then Enter and Ctrl-D:");
    }
    let mut value = Vec::new();
    stdin
        .read_to_end(&mut value)
        .context("cannot read the secret's value from standard input")?;
    Ok(strip_newline(value))
}

fn strip_newline(mut value: Vec<u8>) -> Vec<u8> {
    if value.last() == Some(&b'\n') {
        value.pop();
        if value.last() == Some(&b'\r') {
            value.pop();
        }
    }
    value
}

fn when(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    tributary_agent::kept::format_time(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(strip_newline(b"abc\n".to_vec()), b"abc");
        assert_eq!(strip_newline(b"abc\r\n".to_vec()), b"abc");
        assert_eq!(strip_newline(b"abc\n\n".to_vec()), b"abc\n");
        assert_eq!(strip_newline(b"a\nb".to_vec()), b"a\nb");
    }
}
