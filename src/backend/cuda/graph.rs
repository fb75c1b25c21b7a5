//! CUDA graphs for the denoising step: [`CudaStepGraphs`], the CUDA backend's
//! [`StepGraphSession`] (how it works: the `# CUDA graphs` notes of
//! `executor.rs`), the step-input binding the ops read their per-step host
//! values through, and the RAII wrapper of the driver's graph handles.

use super::buffer::DeviceBuffer;
use super::executor::CudaBackend;
use crate::backend::{StepFn, StepGraphSession, StepInputs};
use crate::tensor::{DType, Storage, Tensor};
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys, CudaContext};
use std::sync::Arc;

/// Whether `QC_CUDA_GRAPHS` allows graphs (unset or `1`: yes, `0`: no).
pub fn graphs_from_env() -> Result<bool> {
    match std::env::var("QC_CUDA_GRAPHS") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            _ => bail!("QC_CUDA_GRAPHS={v:?}: expected 0 (off) or 1 (on)"),
        },
    }
}

/// What the CUDA backend's graph sessions did so far ([`CudaBackend::graph_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps captured, instantiated and launched.
    pub captures: u64,
    /// Steps run by replaying a captured graph.
    pub replays: u64,
    /// Captures that failed (the step then ran eagerly).
    pub failed_captures: u64,
    /// Replays refused because the memory a graph uses had changed (the step was captured again or ran eagerly).
    pub refused_replays: u64,
}

impl std::fmt::Display for GraphStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} captured, {} replayed, {} failed captures, {} refused replays", self.captures, self.replays, self.failed_captures, self.refused_replays)
    }
}

/// Which per-step host values an op reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StepValues {
    /// `timestep_embedding`'s `t`.
    Timesteps,
    /// `euler_step`'s `dt`.
    StepSizes,
}

/// A step input bound to its fixed device buffer while a step runs through a session.
pub(crate) struct BoundInput {
    kind: StepValues,
    values: Vec<f32>,
    buf: DeviceBuffer,
    /// How many ops read it in this step.
    uses: usize,
}

/// The step inputs of the step running through a session now.
#[derive(Default)]
pub(crate) struct StepBinding {
    inputs: Vec<BoundInput>,
}

impl CudaBackend {
    /// `values` on the device for an op that reads per-step host values of `kind`:
    /// while a step runs through a session, the bound input's fixed buffer when
    /// `values` are exactly that input's, else a copy cached by contents (so a
    /// captured step uploads nothing: constants such as the fps were cached by the
    /// warm-up); outside a session, a fresh upload.
    pub(crate) fn step_values(&self, kind: StepValues, values: &[f32]) -> Result<DeviceBuffer> {
        {
            let mut binding = self.binding.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = binding.as_mut() else {
                drop(binding);
                return self.upload_slice(DType::F32, values);
            };
            let same = |v: &[f32]| v.len() == values.len() && v.iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits());
            if let Some(input) = b.inputs.iter_mut().find(|i| i.kind == kind && same(&i.values)) {
                input.uses += 1;
                return Ok(input.buf.clone());
            }
        }
        let tag = match kind {
            StepValues::Timesteps => b'T',
            StepValues::StepSizes => b'D',
        };
        self.f32_array(tag, values)
    }

    /// Turns CUDA graphs for the denoising step on or off (initially per
    /// `QC_CUDA_GRAPHS`); the next sampling run follows it.
    pub fn set_cuda_graphs(&self, on: bool) {
        self.graphs_on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether sampling runs capture and replay the denoising step (see [`Self::set_cuda_graphs`]).
    pub fn cuda_graphs(&self) -> bool {
        self.graphs_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Captures and replays so far, over every sampling run on this backend.
    pub fn graph_stats(&self) -> GraphStats {
        *self.graph_stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut GraphStats)) {
        f(&mut self.graph_stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The session of one sampling run (the `Backend::step_graphs` of this backend).
    pub(crate) fn step_graph_session(&self) -> Option<Box<dyn StepGraphSession + '_>> {
        if !self.cuda_graphs() {
            return None;
        }
        if self.sync_each_launch {
            self.note_once("graphs-sync", || "QC_CUDA_SYNC=1 synchronizes after every launch: the denoising steps run without CUDA graphs".to_string());
            return None;
        }
        Some(Box::new(CudaStepGraphs { be: self, timesteps: None, step_sizes: None, captured: None }))
    }
}

/// A captured graph and its executable instantiation; both destroyed on drop
/// (an executable still running is freed by the driver when it completes).
struct Graph {
    ctx: Arc<CudaContext>,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: the handles came from cuStreamEndCapture / cuGraphInstantiateWithFlags
        // in this context and are destroyed once, here.
        unsafe {
            if !self.exec.is_null() {
                let _ = sys::cuGraphExecDestroy(self.exec);
            }
            if !self.graph.is_null() {
                let _ = sys::cuGraphDestroy(self.graph);
            }
        }
    }
}

/// The step captured last, with what a replay must find unchanged.
struct Captured {
    graph: Graph,
    /// The velocity buffer the graph writes (held here, so it stays allocated).
    v: Tensor,
    /// Address of the latent the graph updates in place.
    latent: u64,
    /// The arena's [`changes`](super::arena::Arena::changes) after the capture.
    arena_changes: u64,
    lens: (usize, usize),
}

/// The CUDA backend's [`StepGraphSession`]: fixed device buffers for the step
/// inputs and at most one captured graph.
pub struct CudaStepGraphs<'a> {
    be: &'a CudaBackend,
    timesteps: Option<DeviceBuffer>,
    step_sizes: Option<DeviceBuffer>,
    captured: Option<Captured>,
}

impl CudaStepGraphs<'_> {
    /// Writes `values` into the fixed buffer of `kind` (made on first use, outside
    /// the arena); `None` for no values. The length may not change within a session.
    fn write_slot(&mut self, kind: StepValues, values: &[f32]) -> Result<Option<DeviceBuffer>> {
        if values.is_empty() {
            return Ok(None);
        }
        let be = self.be;
        let slot = match kind {
            StepValues::Timesteps => &mut self.timesteps,
            StepValues::StepSizes => &mut self.step_sizes,
        };
        match slot {
            Some(b) => {
                let n = b.len_bytes() / 4;
                if n != values.len() {
                    bail!("step input {kind:?} changed from {n} to {} values within one sampling run", values.len());
                }
                be.copy_h2d(b.address(), values)?;
            }
            None => *slot = Some(be.upload_raw(DType::F32, values, "the denoising step's inputs")?),
        }
        Ok(slot.clone())
    }

    /// Writes `inputs` into their buffers and binds them for the ops.
    fn bind(&mut self, inputs: &StepInputs) -> Result<()> {
        let mut binding = StepBinding::default();
        for (kind, values) in [(StepValues::Timesteps, inputs.timesteps), (StepValues::StepSizes, inputs.step_sizes)] {
            if let Some(buf) = self.write_slot(kind, values)? {
                binding.inputs.push(BoundInput { kind, values: values.to_vec(), buf, uses: 0 });
            }
        }
        *self.be.binding.lock().unwrap_or_else(|p| p.into_inner()) = Some(binding);
        Ok(())
    }

    fn unbind(&self) -> Option<StepBinding> {
        self.be.binding.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Stream capture of `step`, then instantiation: the graph and the step's velocity.
    fn record(&mut self, inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> std::result::Result<(Graph, Tensor), String> {
        let be = self.be;
        let stream = be.stream.cu_stream();
        be.bind().map_err(|e| format!("{e:#}"))?;
        self.bind(inputs).map_err(|e| format!("{e:#}"))?;
        be.set_capturing(true);
        // SAFETY: the backend's own (non-default, non-blocking) stream; thread-local
        // mode forbids unsafe calls (cuMemAlloc, synchronizations) from this thread only.
        let begun = unsafe { sys::cuStreamBeginCapture_v2(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) }.result();
        let out = match begun {
            Ok(()) => step(z),
            Err(e) => Err(anyhow!("cuStreamBeginCapture: {e}")),
        };
        let mut graph = Graph { ctx: be.ctx.clone(), graph: std::ptr::null_mut(), exec: std::ptr::null_mut() };
        // SAFETY: ends the capture begun above (always, so the stream leaves capture mode).
        let ended = if begun.is_ok() { unsafe { sys::cuStreamEndCapture(stream, &mut graph.graph) }.result() } else { Ok(()) };
        be.set_capturing(false);
        let binding = self.unbind();
        let v = out.map_err(|e| format!("{e:#}"))?;
        ended.map_err(|e| format!("cuStreamEndCapture: {e}"))?;
        if graph.graph.is_null() {
            return Err("the capture produced no graph".to_string());
        }
        // Each step input must have been read exactly once: a second reader with equal
        // values (say the fps equal to the timestep) would be bound to the wrong input.
        for input in binding.map(|b| b.inputs).unwrap_or_default() {
            if input.uses != 1 {
                return Err(format!("the step read its {:?} {} times (expected once)", input.kind, input.uses));
            }
        }
        // SAFETY: a valid graph; exec is written on success and owned by `graph` from here.
        unsafe { sys::cuGraphInstantiateWithFlags(&mut graph.exec, graph.graph, 0) }.result().map_err(|e| format!("cuGraphInstantiateWithFlags: {e}"))?;
        Ok((graph, v))
    }

    fn launch(&self, graph: &Graph) -> Result<()> {
        self.be.bind()?;
        // SAFETY: an instantiated graph of this context; every buffer it uses is alive
        // (checked by the callers: held by the session or unchanged arena blocks).
        unsafe { sys::cuGraphLaunch(graph.exec, self.be.stream.cu_stream()) }.result().map_err(|e| anyhow!("cuGraphLaunch: {e}"))
    }
}

/// The device address of `z` when it is a unique f32 device tensor.
fn unique_latent(z: &Tensor) -> Option<u64> {
    match z.storage() {
        Storage::Cuda(b) if b.dtype == DType::F32 && b.is_unique() => Some(b.address()),
        _ => None,
    }
}

impl StepGraphSession for CudaStepGraphs<'_> {
    fn run_bound(&mut self, inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<Tensor> {
        self.bind(inputs)?;
        let out = step(z);
        self.unbind();
        out
    }

    fn capture(&mut self, inputs: &StepInputs, z: &mut Tensor, step: &mut StepFn) -> Result<std::result::Result<Tensor, String>> {
        self.captured = None;
        // The latent must already be where the step updates it in place (nothing to
        // copy inside the capture): a unique, aligned f32 device buffer.
        let latent = self.be.own(z, DType::F32)?.address();
        let recorded = self.record(inputs, z, step);
        // The step updates z in place; a step that replaced its buffer would have left
        // z pointing at memory the capture never wrote.
        if unique_latent(z) != Some(latent) {
            bail!("the denoising step replaced the latent's buffer while being captured (it must update z in place)");
        }
        let (graph, v) = match recorded {
            Ok(r) => r,
            Err(why) => {
                self.be.count(|s| s.failed_captures += 1);
                return Ok(Err(why));
            }
        };
        if let Err(e) = self.launch(&graph) {
            self.be.count(|s| s.failed_captures += 1);
            return Ok(Err(format!("{e:#}")));
        }
        self.be.after_launch("the denoising step's CUDA graph")?;
        self.be.count(|s| s.captures += 1);
        let lens = (inputs.timesteps.len(), inputs.step_sizes.len());
        self.captured = Some(Captured { graph, v: v.clone(), latent, arena_changes: self.be.arena.changes(), lens });
        Ok(Ok(v))
    }

    fn replay(&mut self, inputs: &StepInputs, z: &mut Tensor) -> Result<Option<Tensor>> {
        let Some(c) = self.captured.take() else { return Ok(None) };
        // Safe only when every block the graph touches is as the capture left it: no
        // allocation or free since (its temporaries are free, nothing else lives in
        // them), z is the latent it updates and nothing else shares that or the
        // velocity it overwrites.
        let v_unshared = matches!(c.v.storage(), Storage::Cuda(b) if b.is_unique());
        let same = self.be.arena.changes() == c.arena_changes && unique_latent(z) == Some(c.latent) && v_unshared && (inputs.timesteps.len(), inputs.step_sizes.len()) == c.lens;
        if !same {
            self.be.count(|s| s.refused_replays += 1);
            return Ok(None);
        }
        self.write_slot(StepValues::Timesteps, inputs.timesteps)?;
        self.write_slot(StepValues::StepSizes, inputs.step_sizes)?;
        self.launch(&c.graph).map_err(|e| anyhow!("replaying the denoising step's CUDA graph: {e:#}"))?;
        self.be.after_launch("the denoising step's CUDA graph")?;
        self.be.count(|s| s.replays += 1);
        let v = c.v.clone();
        self.captured = Some(c);
        Ok(Some(v))
    }
}
