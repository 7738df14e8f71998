//! The binary: parse the configuration, route signals to a stop channel, run (or check, or report the
//! status), map the result to an exit code.

use std::process::ExitCode;

use opencode_mattermost::config::{self, Invocation};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match config::parse(&args, &|name| std::env::var(name).ok()) {
        Ok(Invocation::Run(config)) => config,
        Ok(Invocation::Check(config)) => return check(&config),
        Ok(Invocation::Status { state_dir, json }) => return status(&state_dir, json),
        Ok(Invocation::Help) => return print(&config::help_text()),
        Ok(Invocation::Version) => {
            return print(&format!("opencode-mattermost {}", config::VERSION));
        }
        Err(e) => return fail(&e.to_string(), 2),
    };
    let (stop_tx, stop) = crossbeam_channel::bounded(1);
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]);
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = stop_tx.send(());
                }
            });
        }
        Err(e) => return fail(&format!("cannot install signal handlers: {e}"), 1),
    }
    match opencode_mattermost::run(config, stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn check(config: &Result<config::Config, config::ConfigError>) -> ExitCode {
    let code = opencode_mattermost::check::run(config, &mut |line| out(&format!("{line}\n")));
    ExitCode::from(code as u8)
}

fn status(state_dir: &std::path::Path, json: bool) -> ExitCode {
    let (text, code) = opencode_mattermost::status::show(state_dir, json);
    out(&text);
    ExitCode::from(code as u8)
}

fn print(text: &str) -> ExitCode {
    out(&format!("{text}\n"));
    ExitCode::SUCCESS
}

/// Writes to stdout, ignoring a closed pipe (`--help | head`), which `println!` would panic on.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

fn fail(message: &str, code: i32) -> ExitCode {
    eprintln!("opencode-mattermost: {message}");
    ExitCode::from(code as u8)
}
