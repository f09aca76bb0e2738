//! llama.cpp for comparison: its Python found or installed once, and one run of the comparison
//! script.

use super::*;

/// The Python that imports llama.cpp: `FERRY_LLAMA_CPP_PYTHON` when the caller already ran the
/// set-up (empty when it failed there, so a failed compile is not tried twice), or else the set-up
/// script's answer, installing llama.cpp if needed (the benchmark's own set-up).
pub fn llama_cpp_python() -> anyhow::Result<PathBuf> {
    if let Some(python) = std::env::var_os("FERRY_LLAMA_CPP_PYTHON") {
        ensure!(!python.is_empty(), "scripts/setup-llama-cpp.sh failed before the run");
        return Ok(PathBuf::from(python));
    }
    let script = repo_root().join("scripts/setup-llama-cpp.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    ensure!(out.status.success(), "{} failed ({})", script.display(), out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let python = stdout
        .lines()
        .last()
        .context("the set-up script named no interpreter")?;
    Ok(PathBuf::from(python.trim()))
}

/// One llama.cpp run of `prompt` through the comparison script.
pub fn llama_cpp_run(
    python: &Path,
    model: &Path,
    threads: usize,
    prompt: &[u32],
    decode_tokens: usize,
) -> anyhow::Result<Value> {
    let script = repo_root().join("scripts/llama_cpp_bench.py");
    let mut child = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--threads")
        .arg(threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", python.display()))?;
    let request = json!({ "prompt": prompt, "decode_tokens": decode_tokens, "repeats": 1 });
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "llama_cpp_bench.py failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The Python that imports llama.cpp, found once per run (see [`llama_cpp_python`]), or why not.
pub type LlamaCpp = Result<PathBuf, String>;
