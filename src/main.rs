//! The binary: parse the configuration, route signals to a stop channel, run (or check, or report the
//! status), map the result to an exit code.

use std::process::ExitCode;

use opencode_mattermost::config::{self, Invocation};

/// A panic outside a session worker is a bug that leaves the process half alive: exit so that a
/// supervisor (systemd's `Restart=on-failure`) starts a fresh one. Listed in the README's exit codes.
const EXIT_PANIC: i32 = 4;

fn main() -> ExitCode {
    opencode_mattermost::memory::restart_with_tunables();
    opencode_mattermost::memory::tune_allocator();
    install_panic_hook();
    let args = std::env::args_os().skip(1);
    let run = match config::parse_os(args, &|name| std::env::var_os(name)) {
        Ok(Invocation::Run(config)) => Run::One(config),
        Ok(Invocation::RunLinks(set)) => Run::Links(set),
        Ok(Invocation::Check(config)) => return check(&config),
        Ok(Invocation::CheckLinks(set)) => return check_links(&set),
        Ok(Invocation::Status {
            state_dir,
            json,
            links_dir,
        }) => return status(&state_dir, json, links_dir.as_deref()),
        Ok(Invocation::Help) => return print(&config::help_text()),
        Ok(Invocation::Version) => {
            return print(&format!("opencode-mattermost {}", config::VERSION));
        }
        Err(e) => return fail(&e.to_string(), 2),
    };
    let (stop_tx, stop) = crossbeam_channel::bounded(1);
    // SIGHUP (`systemctl reload`) reads OPENCODE_MM_LINKS_DIR again; bounded(1): HUPs in a row
    // make one reload.
    let (reload_tx, reload) = crossbeam_channel::bounded(1);
    let links = matches!(run, Run::Links(_));
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]);
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for signal in signals.forever() {
                    if signal != signal_hook::consts::SIGHUP {
                        let _ = stop_tx.send(());
                        return;
                    }
                    if links {
                        let _ = reload_tx.try_send(());
                    } else {
                        opencode_mattermost::info!(
                            "SIGHUP: nothing to reload without OPENCODE_MM_LINKS_DIR; restart the \
                             bridge to apply changed settings"
                        );
                    }
                }
            });
        }
        Err(e) => return fail(&format!("cannot install signal handlers: {e}"), 1),
    }
    let result = match run {
        Run::One(config) => opencode_mattermost::run(config, stop),
        Run::Links(set) => opencode_mattermost::links::run(set, stop, reload),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

/// Replaces the default hook, which prints the unmasked message over several lines, with one masked
/// log line. A session worker (thread `session-…`, or its `compact-…` helper) stands for one session:
/// the worker catches its own panic at its boundary and the other sessions go on. Any other thread
/// (the router, a reader, the heartbeat, start-up) ends the process with `EXIT_PANIC`.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if name.starts_with("session-") || name.starts_with("compact-") {
            opencode_mattermost::error!(
                "thread {name} panicked at {place}: {message}; this is a bug; that session's worker stops, \
                 the others go on"
            );
            return;
        }
        opencode_mattermost::error!(
            "thread {name} panicked at {place}: {message}; this is a bug; exiting with code {EXIT_PANIC} \
             so that a supervisor restarts the bridge"
        );
        std::process::exit(EXIT_PANIC);
    }));
}

/// One bridge from the environment, or one per link file.
enum Run {
    One(config::Config),
    Links(config::links::LinkSet),
}

fn check_links(set: &Result<config::links::LinkSet, config::ConfigError>) -> ExitCode {
    let code = opencode_mattermost::check::run_links(set, &mut |line| out(&format!("{line}\n")));
    ExitCode::from(code as u8)
}

fn check(config: &Result<config::Config, config::ConfigError>) -> ExitCode {
    let code = opencode_mattermost::check::run(config, &mut |line| out(&format!("{line}\n")));
    ExitCode::from(code as u8)
}

fn status(
    state_dir: &std::path::Path,
    json: bool,
    links_dir: Option<&std::path::Path>,
) -> ExitCode {
    let (text, code) = match links_dir {
        Some(dir) => opencode_mattermost::status::show_links(state_dir, dir, json),
        None => opencode_mattermost::status::show(state_dir, json),
    };
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
