//! `tributary`: the command-line edge of Tributary. Errors become messages and exit codes
//! here (anyhow); everything below is typed.

mod agent;
mod artifacts;
mod autoscaler;
mod backends;
mod bench;
mod cli;
mod client;
mod commands;
mod data_dir;
mod dir_lock;
mod health;
mod history;
mod init;
mod local_run;
mod memory;
mod metering;
mod render;
mod repo_access;
mod roles;
mod secrets;
mod serve;
mod server;
mod waits;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = cli::Cli::parse();
    // A local run reports its jobs' failures itself (the rendered log, the exit code): its
    // diagnostics appear only when TRIBUTARY_LOG asks for them.
    init_tracing(if matches!(cli.command, cli::Command::Run(_)) {
        "off"
    } else {
        "warn"
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Diagnostics on stderr, filtered by TRIBUTARY_LOG (else `default`); coloured only on a
/// terminal.
fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// `tributary events | head` should end quietly like any Unix tool, not panic on a closed
/// pipe: restore the default SIGPIPE action that the Rust runtime sets to "ignore".
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid action
    // for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
