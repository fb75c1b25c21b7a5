//! Open-Sora 1.2's rectified-flow sampler (`RFLOW` in `opensora/schedulers/rf`),
//! with classifier-free guidance. Scalar schedule math follows the reference's
//! float32 order of operations so timesteps agree to the last bits.

use crate::backend::{Backend, StepFn, StepGraphSession, StepInputs};
use crate::model::stdit3::{DitInput, ForwardHooks, NoHooks, Stdit3, StepAction, TextCond};
use crate::sampler::graphs::{GraphPlanner, StepMode};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};

#[derive(Clone, Debug)]
pub struct RflowConfig {
    pub num_steps: usize,
    pub num_timesteps: f32,
    pub cfg_scale: f32,
    pub use_timestep_transform: bool,
}

impl Default for RflowConfig {
    /// The official Open-Sora 1.2 sample config: 30 steps, cfg 7.0, transform on.
    fn default() -> Self {
        RflowConfig { num_steps: 30, num_timesteps: 1000.0, cfg_scale: 7.0, use_timestep_transform: true }
    }
}

/// Per-sample video geometry the schedule depends on.
#[derive(Clone, Debug)]
pub struct VideoGeometry {
    pub height: Vec<f32>,
    pub width: Vec<f32>,
    pub num_frames: Vec<f32>,
    pub fps: Vec<f32>,
}

/// `timestep_transform`: `t' = r t / (1 + (r - 1) t)` with
/// `r = sqrt(H W / 512^2) * sqrt(num_frames // 17 * 5)` (1 frame counts as 1).
fn transform(t: f32, num_timesteps: f32, height: f32, width: f32, num_frames: f32, first_frames: f32) -> f32 {
    let t = t / num_timesteps;
    let ratio_space = (height * width / (512.0 * 512.0)).sqrt();
    let frames = if first_frames == 1.0 { 1.0 } else { (num_frames / 17.0).floor() * 5.0 };
    let ratio = ratio_space * frames.sqrt();
    let new_t = ratio * t / (1.0 + (ratio - 1.0) * t);
    new_t * num_timesteps
}

/// The schedule: `[steps][batch]` timesteps in 0..num_timesteps.
pub fn timesteps(cfg: &RflowConfig, geo: &VideoGeometry) -> Result<Vec<Vec<f32>>> {
    let b = geo.height.len();
    ensure!(cfg.num_steps > 0, "the number of sampling steps must be at least 1");
    ensure!(b > 0 && geo.width.len() == b && geo.num_frames.len() == b, "height, width and num_frames must each have one entry per sample");
    for (name, v) in [("height", &geo.height), ("width", &geo.width), ("num_frames", &geo.num_frames)] {
        if let Some(bad) = v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
            bail!("{name} must be positive, got {bad}");
        }
    }
    Ok((0..cfg.num_steps)
        .map(|i| {
            let t = ((1.0 - i as f64 / cfg.num_steps as f64) * cfg.num_timesteps as f64) as f32;
            (0..b)
                .map(|s| if cfg.use_timestep_transform { transform(t, cfg.num_timesteps, geo.height[s], geo.width[s], geo.num_frames[s], geo.num_frames[0]) } else { t })
                .collect()
        })
        .collect())
}

/// Runs the sampler from `z0` (`[B, C, T, H, W]` noise) with captions `y`
/// (`[B, 1, L, C_caption]`) and their `mask` (`[B, L]`). Returns the final
/// latent and the timesteps used. `progress(step, steps)` is called after each step.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    be: &dyn Backend,
    model: &Stdit3,
    cfg: &RflowConfig,
    z0: &Tensor,
    y: &Tensor,
    mask: Option<&[i64]>,
    geo: &VideoGeometry,
    hooks: &mut dyn ForwardHooks,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Tensor, Vec<Vec<f32>>)> {
    sample_with_progress(be, model, cfg, z0, y, mask, geo, hooks, &mut |i, n| {
        progress(i, n);
        Ok(())
    })
}

/// [`sample`] whose `progress(step, steps)` can stop it: an error it returns
/// ends sampling after that step and is returned (how a caller cancels).
///
/// On a backend with step graphs ([`Backend::step_graphs`], the CUDA backend
/// unless turned off) the computing steps whose hooks give a
/// [`graph_key`](ForwardHooks::graph_key) are captured once and replayed (see
/// `sampler::graphs`); the result is the same, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn sample_with_progress(
    be: &dyn Backend,
    model: &Stdit3,
    cfg: &RflowConfig,
    z0: &Tensor,
    y: &Tensor,
    mask: Option<&[i64]>,
    geo: &VideoGeometry,
    hooks: &mut dyn ForwardHooks,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<(Tensor, Vec<Vec<f32>>)> {
    let zs = z0.shape();
    ensure!(zs.len() == 5, "initial noise z0 must be [B, C, T, H, W], got {zs:?}");
    let b = zs[0];
    ensure!(y.shape().first() == Some(&b), "captions y {:?} do not match the noise batch {b}", y.shape());
    ensure!(geo.height.len() == b, "geometry has {} samples, noise has {b}", geo.height.len());
    ensure!(cfg.cfg_scale.is_finite(), "cfg scale must be finite");
    if let Some(bad) = z0.find_non_finite() {
        bail!("initial noise z0 contains a non-finite value at flat index {bad}");
    }
    let ts = timesteps(cfg, geo)?;

    let text = guidance_text(be, model, y, mask, hooks)?;

    let mut z = z0.clone();
    let mut last_v: Option<Tensor> = None;
    // The conditional and unconditional velocities of the last two steps that computed each.
    let (mut cond_hist, mut uncond_hist) = (History::default(), History::default());
    let mut cond_text: Option<TextCond> = None;
    let mut graphs = be.step_graphs().map(|session| (session, GraphPlanner::default()));
    for (i, t) in ts.iter().enumerate() {
        let dt = step_sizes(&ts, i, cfg.num_timesteps);
        hooks.timestep(t[0]);
        let mut action = hooks.step_action(i, ts.len());
        let slope = hooks.extrapolation_slope();
        // Without a computed step to reuse, a reuse computes.
        if action != StepAction::Compute && uncond_hist.is_empty() {
            action = StepAction::Compute;
        }
        // The previous velocity is dropped before a computing step (nothing else holds it).
        let previous = last_v.take();
        let bound = |session: &mut Option<(Box<dyn StepGraphSession + '_>, GraphPlanner)>, z: &mut Tensor, step: &mut StepFn| -> Result<Tensor> {
            match session {
                // Bound, the step's upload goes to the session's buffer and leaves
                // a captured graph's memory as it was.
                Some((session, planner)) if planner.active() => session.run_bound(&StepInputs { timesteps: &[], step_sizes: &dt }, z, step),
                _ => step(z),
            }
        };
        let v = match action {
            StepAction::ReusePrevious | StepAction::Extrapolate | StepAction::ComputeConditional => {
                let mut step = |z: &mut Tensor| -> Result<Tensor> {
                    let v = match action {
                        StepAction::ReusePrevious => previous.clone().ok_or_else(|| anyhow::anyhow!("no previous velocity"))?,
                        StepAction::Extrapolate => be.guidance(&cond_hist.at(be, t[0], slope)?, &uncond_hist.at(be, t[0], slope)?, cfg.cfg_scale)?,
                        _ => {
                            let text = match &mut cond_text {
                                Some(c) => &*c,
                                None => cond_text.insert(text.first(be, b)?),
                            };
                            let cond = conditional_velocity(be, model, text, z, t, geo)?;
                            let v = be.guidance(&cond, &uncond_hist.at(be, t[0], slope)?, cfg.cfg_scale)?;
                            cond_hist.push(t[0], cond);
                            v
                        }
                    };
                    be.euler_step(z, &v, &dt)?;
                    Ok(v)
                };
                bound(&mut graphs, &mut z, &mut step)?
            }
            StepAction::Compute => {
                let t_in: Vec<f32> = t.iter().chain(t.iter()).copied().collect();
                let key = match &graphs {
                    // Steps in different weight sets (per-range aigq plans) run other weights.
                    Some((_, planner)) if planner.active() => hooks.graph_key(i, ts.len()).map(|k| k.wrapping_mul(0x0100_0000_01b3) ^ model.phase_of(t[0]) as u64),
                    _ => None,
                };
                let mut halves = None;
                let mut compute = |z: &mut Tensor| -> Result<Tensor> {
                    let (cond, uncond) = velocity_halves(be, model, &text, z, &t_in, geo, hooks)?;
                    let v = be.guidance(&cond, &uncond, cfg.cfg_scale)?;
                    be.euler_step(z, &v, &dt)?;
                    halves = Some((cond, uncond));
                    Ok(v)
                };
                let v = match (&mut graphs, key) {
                    (Some((session, planner)), Some(key)) => {
                        let inputs = StepInputs { timesteps: &t_in, step_sizes: &dt };
                        run_with_graphs(session.as_mut(), planner, key, ts.len() - 1 - i, &inputs, &mut z, &mut compute)?
                    }
                    _ => compute(&mut z)?,
                };
                // A replayed graph leaves no halves: policies that extrapolate run eagerly (no key).
                if let Some((cond, uncond)) = halves {
                    cond_hist.push(t[0], cond);
                    uncond_hist.push(t[0], uncond);
                }
                v
            }
        };
        last_v = Some(v);
        progress(i + 1, ts.len())?;
    }
    Ok((z, ts))
}

/// The text conditioning of classifier-free guidance for captions `y`
/// (`[B, 1, L, C_caption]`): the conditional and unconditional halves in one
/// batch; the null caption is masked with the prompt's mask, as the reference
/// repeats the mask.
pub fn guidance_text(be: &dyn Backend, model: &Stdit3, y: &Tensor, mask: Option<&[i64]>, hooks: &mut dyn ForwardHooks) -> Result<TextCond> {
    let b = y.shape().first().copied().unwrap_or(0);
    let (l, cc) = (model.cfg.model_max_length, model.cfg.caption_channels);
    ensure!(y.shape() == [b, 1, l, cc], "captions y must be [{b}, 1, {l}, {cc}], got {:?}", y.shape());
    let null = model.w.y_embedding.clone().reshape(&[1, 1, l, cc])?;
    let mut parts = vec![y];
    parts.extend(std::iter::repeat_n(&null, b));
    let y_all = be.concat(&parts)?;
    model.encode_text(be, &y_all, mask, hooks)
}

/// Step `i`'s Euler step sizes per sample: the distance to the next timestep
/// (to 0 after the last), as a fraction of `num_timesteps`.
pub fn step_sizes(ts: &[Vec<f32>], i: usize, num_timesteps: f32) -> Vec<f32> {
    let t = &ts[i];
    (0..t.len())
        .map(|s| {
            let d = if i + 1 < ts.len() { t[s] - ts[i + 1][s] } else { t[s] };
            d / num_timesteps
        })
        .collect()
}

/// The classifier-free-guided velocity at latent `z` (`[B, C, T, H, W]`): one
/// DiT forward of the conditional and unconditional halves (`text` encodes
/// both, `t_in` has `2B` timesteps), combined with `cfg_scale`.
#[allow(clippy::too_many_arguments)]
pub fn guided_velocity(be: &dyn Backend, model: &Stdit3, text: &TextCond, z: &Tensor, t_in: &[f32], geo: &VideoGeometry, cfg_scale: f32, hooks: &mut dyn ForwardHooks) -> Result<Tensor> {
    let (cond, uncond) = velocity_halves(be, model, text, z, t_in, geo, hooks)?;
    be.guidance(&cond, &uncond, cfg_scale)
}

/// The conditional and unconditional velocities at `z`, from one forward of both halves.
fn velocity_halves(be: &dyn Backend, model: &Stdit3, text: &TextCond, z: &Tensor, t_in: &[f32], geo: &VideoGeometry, hooks: &mut dyn ForwardHooks) -> Result<(Tensor, Tensor)> {
    let b = z.shape()[0];
    let z_in = be.concat(&[z, z])?;
    let inp = DitInput { x: &z_in, timestep: t_in, fps: &geo.fps, height: geo.height[0], width: geo.width[0], x_mask: None };
    let pred = be.narrow(&model.forward(be, &inp, text, hooks)?, 1, 0, model.cfg.in_channels)?;
    Ok((be.narrow(&pred, 0, 0, b)?, be.narrow(&pred, 0, b, b)?))
}

/// The conditional velocity alone (`text` the conditional half's), from a forward of
/// half the rows; no hooks are called inside it (policies' caches hold both halves).
fn conditional_velocity(be: &dyn Backend, model: &Stdit3, text: &TextCond, z: &Tensor, t: &[f32], geo: &VideoGeometry) -> Result<Tensor> {
    let inp = DitInput { x: z, timestep: t, fps: &geo.fps, height: geo.height[0], width: geo.width[0], x_mask: None };
    be.narrow(&model.forward(be, &inp, text, &mut NoHooks)?, 1, 0, model.cfg.in_channels)
}

/// One guidance half's velocities at its last two computed steps, for reuse by
/// extrapolation along their line in t.
#[derive(Default)]
struct History {
    entries: Vec<(f32, Tensor)>,
}

impl History {
    fn push(&mut self, t: f32, v: Tensor) {
        if self.entries.len() == 2 {
            self.entries.remove(0);
        }
        self.entries.push((t, v));
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The velocity at `t` from the last one along the line through the last two,
    /// its slope times `slope` (the last one alone when only one).
    fn at(&self, be: &dyn Backend, t: f32, slope: f32) -> Result<Tensor> {
        match self.entries.as_slice() {
            [(t0, v0), (t1, v1)] if t1 != t0 => be.guidance(v1, v0, 1.0 + slope * (t - t1) / (t1 - t0)),
            [.., (_, v)] => Ok(v.clone()),
            [] => Err(anyhow::anyhow!("no computed velocity to extrapolate from")),
        }
    }
}

/// One computing step of graph key `key` as the planner decides (see `sampler::graphs`).
fn run_with_graphs(session: &mut dyn StepGraphSession, planner: &mut GraphPlanner, key: u64, steps_left: usize, inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<Tensor> {
    let mut mode = planner.mode(Some(key), steps_left);
    if mode == StepMode::Replay {
        if let Some(v) = session.replay(inputs, z)? {
            return Ok(v);
        }
        planner.replay_refused();
        mode = planner.mode(Some(key), steps_left);
    }
    let v = match mode {
        StepMode::Capture => match session.capture(inputs, z, step)? {
            Ok(v) => v,
            Err(why) => {
                eprintln!("note: the denoising step could not be captured as a device graph ({why}); the remaining steps run eagerly");
                planner.capture_failed();
                return step(z);
            }
        },
        StepMode::WarmUp => session.run_bound(inputs, z, step)?,
        StepMode::Eager | StepMode::Replay => step(z)?,
    };
    planner.ran(key, mode);
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn history_extrapolates_along_the_line_in_t() {
        let be = crate::backend::cpu::CpuBackend::new();
        let mut h = super::History::default();
        assert!(h.at(&be, 900.0, 1.0).is_err());
        h.push(1000.0, Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap());
        assert_eq!(h.at(&be, 900.0, 1.0).unwrap().f32().unwrap(), &[1.0, 2.0], "one entry: reused");
        h.push(950.0, Tensor::from_f32(&[2], vec![2.0, 2.0]).unwrap());
        assert_eq!(h.at(&be, 900.0, 1.0).unwrap().f32().unwrap(), &[3.0, 2.0]);
        // A quarter of the slope: a quarter of the way.
        assert_eq!(h.at(&be, 900.0, 0.25).unwrap().f32().unwrap(), &[2.25, 2.0]);
        assert_eq!(h.at(&be, 900.0, 0.0).unwrap().f32().unwrap(), &[2.0, 2.0], "slope 0: the last one");
        h.push(900.0, Tensor::from_f32(&[2], vec![3.0, 1.0]).unwrap());
        // Only the last two are kept.
        assert_eq!(h.at(&be, 800.0, 1.0).unwrap().f32().unwrap(), &[5.0, -1.0]);
    }

    use super::*;

    /// A session that records what the sampler asked of it; the step it captures
    /// runs at once (standing for the graph's first launch).
    #[derive(Default)]
    struct Recorder {
        calls: Vec<&'static str>,
        fail_capture: bool,
        refuse_replay: bool,
    }

    impl StepGraphSession for Recorder {
        fn run_bound(&mut self, _inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<Tensor> {
            self.calls.push("bound");
            step(z)
        }
        fn capture(&mut self, _inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<std::result::Result<Tensor, String>> {
            self.calls.push("capture");
            if self.fail_capture {
                return Ok(Err("not capturable".into()));
            }
            step(z).map(Ok)
        }
        fn replay(&mut self, _inputs: &StepInputs, z: &mut Tensor) -> Result<Option<Tensor>> {
            self.calls.push("replay");
            Ok((!self.refuse_replay).then(|| z.clone()))
        }
    }

    /// Runs `steps` computing steps of one key; returns the session's calls and how often the step ran on the host side.
    fn run(steps: usize, session: &mut Recorder) -> (Vec<&'static str>, usize) {
        let mut planner = GraphPlanner::default();
        let mut z = Tensor::from_f32(&[1], vec![0.0]).unwrap();
        let mut ran = 0;
        for i in 0..steps {
            let mut step = |z: &mut Tensor| -> Result<Tensor> {
                ran += 1;
                Ok(z.clone())
            };
            let inputs = StepInputs { timesteps: &[1.0], step_sizes: &[0.1] };
            run_with_graphs(session, &mut planner, 0, steps - 1 - i, &inputs, &mut z, &mut step).unwrap();
        }
        (std::mem::take(&mut session.calls), ran)
    }

    #[test]
    fn steps_warm_up_capture_and_replay() {
        let (calls, ran) = run(5, &mut Recorder::default());
        assert_eq!(calls, ["bound", "capture", "replay", "replay", "replay"]);
        assert_eq!(ran, 2, "replayed steps do not run the step's host code");
    }

    #[test]
    fn a_failed_capture_runs_the_step_eagerly_once_and_turns_graphs_off() {
        let (calls, ran) = run(4, &mut Recorder { fail_capture: true, ..Recorder::default() });
        assert_eq!(calls, ["bound", "capture"]);
        assert_eq!(ran, 4, "every step ran exactly once");
    }

    #[test]
    fn a_refused_replay_is_captured_again() {
        let (calls, ran) = run(4, &mut Recorder { refuse_replay: true, ..Recorder::default() });
        assert_eq!(calls, ["bound", "capture", "replay", "capture", "replay", "bound"]);
        assert_eq!(ran, 4);
    }
}
