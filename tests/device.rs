//! Devices and precision: bf16 matrix products on the reference engine (run here on the CPU,
//! which candle supports), the refusals, and, in a CUDA build on a machine with a GPU, the GPU
//! against the CPU. In a default build the GPU tests are listed as ignored with the reason.

mod common;

use candle_core::{DType, Device};
use common::Workspace;
use tinygpt::engine::device::DeviceChoice;
use tinygpt::engine::{EngineChoice, EngineKind};
use tinygpt::model::Precision;
use tinygpt::run::config::Config;
use tinygpt::train::{ProgressMode, Trainer};

fn config(ws: &Workspace, steps: usize, extra: &[&str]) -> Config {
    let mut set: Vec<String> = vec![
        format!("training.max_iters={steps}"),
        "training.lr_decay_iters=20".into(),
        "training.eval_interval=5".into(),
        "training.checkpoint_interval=5".into(),
        "model.dropout=0.1".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    Config::load(&ws.path("tiny.toml"), &set).unwrap()
}

fn losses(t: &Trainer) -> Vec<f64> {
    t.state.history.iter().map(|p| p.train_loss).collect()
}

#[test]
fn bf16_runs_on_the_reference_engine_and_fused_refuses_it() {
    let ws = Workspace::new(2000);
    let cfg = config(&ws, 10, &["training.dtype=\"bf16\""]);
    let (kind, note) = EngineChoice::Auto
        .resolve(&cfg.model, &Device::Cpu, Precision::Bf16)
        .unwrap();
    assert_eq!(kind, EngineKind::Reference);
    assert!(note.unwrap().contains("training.dtype = \"bf16\""));
    let e = EngineChoice::Fused
        .resolve(&cfg.model, &Device::Cpu, Precision::Bf16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not support training.dtype = \"bf16\""),
        "{e}"
    );
    // TF32 is a GPU's: on the CPU the fused kernels take it as the f32 it is there.
    let (kind, _) = EngineChoice::Auto
        .resolve(&cfg.model, &Device::Cpu, Precision::Tf32)
        .unwrap();
    assert_eq!(kind, EngineKind::Fused);
}

/// bf16 products train like f32 ones (losses within bf16's rounding), the checkpoint holds
/// f32 weights, and a bf16 run resumes exactly, and resumes in f32 too.
#[test]
fn bf16_trains_like_f32_saves_f32_and_resumes_exactly() {
    let ws = Workspace::new(4000);
    let engine = "training.engine=\"reference\"";
    let mut f32_run = Trainer::on_device(
        config(&ws, 10, &[engine]),
        &Device::Cpu,
        ProgressMode::Quiet,
    )
    .unwrap();
    f32_run
        .run(&common::run_options(&ws.path("f32"), false))
        .unwrap();
    let bf16 = ["training.dtype=\"bf16\"", engine];
    let mut whole =
        Trainer::on_device(config(&ws, 10, &bf16), &Device::Cpu, ProgressMode::Quiet).unwrap();
    assert_eq!(whole.engine.precision(), Precision::Bf16);
    whole
        .run(&common::run_options(&ws.path("whole"), false))
        .unwrap();
    let (a, b) = (losses(&f32_run), losses(&whole));
    assert_eq!(a.len(), b.len());
    let mut differs = false;
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 0.03, "f32 {a:?} vs bf16 {b:?}");
        differs |= x != y;
    }
    assert!(
        differs,
        "bf16 changed no loss: its products did not run in bf16"
    );

    let st = std::fs::read(ws.path("whole/last/model.safetensors")).unwrap();
    let map = candle_core::safetensors::load_buffer(&st, &Device::Cpu).unwrap();
    assert!(map.values().all(|t| t.dtype() == DType::F32));

    let mut first =
        Trainer::on_device(config(&ws, 5, &bf16), &Device::Cpu, ProgressMode::Quiet).unwrap();
    first
        .run(&common::run_options(&ws.path("half"), false))
        .unwrap();
    let resume = |dtype: &str| {
        common::resume_on_cpu(&ws.path("half/last"), &["training.max_iters=10", dtype])
    };
    let mut second = resume("training.dtype=\"bf16\"");
    second
        .run(&common::run_options(&ws.path("half"), true))
        .unwrap();
    assert_eq!(
        common::param_values(&whole.params),
        common::param_values(&second.params),
        "a bf16 run resumed is the run straight through"
    );
    // The same checkpoint continues in f32 (as a GPU run continues on the CPU).
    let mut in_f32 = resume("training.dtype=\"f32\"");
    assert_eq!(in_f32.engine.precision(), Precision::F32);
    in_f32
        .run(&common::run_options(&ws.path("half"), true))
        .unwrap();
    assert_eq!(in_f32.state.step, 10);
}

#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "a CUDA build: this test is for the default build"
)]
fn a_default_build_refuses_cuda_naming_the_fix_and_writes_nothing() {
    let ws = Workspace::new(2000);
    for cmd in [
        vec![
            "train",
            "--config",
            "tiny.toml",
            "--out",
            "run",
            "--device",
            "cuda",
        ],
        vec!["bench", "--config", "tiny.toml", "--device", "cuda:1"],
        vec!["generate", "--checkpoint", "nowhere", "--device", "cuda"],
    ] {
        let o = common::tinygpt(&cmd, ws.path("").as_path());
        common::fails_with(&o, "built without CUDA");
        let err = common::stderr(&o);
        assert!(
            err.contains("--features cuda") && err.contains("--device cpu"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(!ws.path("run").exists());
    let o = common::tinygpt(
        &["train", "--config", "tiny.toml", "--device", "tpu"],
        ws.path("").as_path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(common::stderr(&o).contains("use cpu, cuda, cuda:N or auto"));
}

/// 20 steps on the GPU in f32 against the same 20 on the CPU (reference engine, dropout off so
/// that only the arithmetic differs): losses agree to about 1e-4, and the GPU's checkpoint
/// loads and resumes on the CPU.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a CUDA build (scripts/build-cuda.sh) and a GPU"
)]
fn cuda_trains_like_the_cpu_and_its_checkpoints_resume_on_the_cpu() {
    let gpu = DeviceChoice::Cuda(0)
        .resolve()
        .expect("a CUDA build with a GPU");
    let ws = Workspace::new(4000);
    let set = [
        "training.engine=\"reference\"",
        "model.dropout=0.0",
        "training.max_iters=20",
        "training.eval_interval=20",
        "training.checkpoint_interval=20",
    ];
    let mut cpu =
        Trainer::on_device(config(&ws, 20, &set), &Device::Cpu, ProgressMode::Quiet).unwrap();
    let mut cuda = Trainer::on_device(config(&ws, 20, &set), &gpu, ProgressMode::Quiet).unwrap();
    let mut worst = 0.0f64;
    for step in 0..20 {
        let (a, b) = (cpu.train_step().unwrap(), cuda.train_step().unwrap());
        worst = worst.max((a - b).abs());
        assert!((a - b).abs() < 2e-4, "step {step}: cpu {a} vs cuda {b}");
    }
    eprintln!("cuda vs cpu, 20 steps in f32: largest loss difference {worst:.2e}");
    cuda.save(&ws.path("gpu/last")).unwrap();
    let mut back = common::resume_on_cpu(&ws.path("gpu/last"), &["training.max_iters=25"]);
    assert_eq!(back.state.step, 20);
    let l = back.train_step().unwrap();
    assert!(l.is_finite() && l < 4.0, "{l}");
    // bf16 on the GPU trains too, within bf16's rounding of f32.
    let mut set16 = set.to_vec();
    set16.push("training.dtype=\"bf16\"");
    let mut half = Trainer::on_device(config(&ws, 20, &set16), &gpu, ProgressMode::Quiet).unwrap();
    let mut exact = Trainer::on_device(config(&ws, 20, &set), &gpu, ProgressMode::Quiet).unwrap();
    for _ in 0..10 {
        let (a, b) = (half.train_step().unwrap(), exact.train_step().unwrap());
        assert!((a - b).abs() < 0.05, "bf16 {a} vs f32 {b}");
    }
}
