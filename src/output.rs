//! Writing generated videos: safetensors (float video + uint8 frames), GIF,
//! a directory of PNG frames, or MP4 through an `ffmpeg` found on PATH.
//! Every file is written under a temporary name and renamed when complete.

use crate::io::{write_atomic, write_safetensors};
use crate::tensor::{Storage, Tensor};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// Output formats, chosen from the output path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Gif,
    Mp4,
    /// One PNG file per video: videos of one frame (images).
    Png,
    PngDir,
}

impl Format {
    /// `.safetensors`, `.gif`, `.mp4`, `.png`; a directory of PNG frames for
    /// a path without an extension or an existing directory; any other
    /// extension is refused (a typo should not become a directory).
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        Ok(match ext.as_deref() {
            Some("safetensors") => Format::Safetensors,
            Some("gif") => Format::Gif,
            Some("mp4") => Format::Mp4,
            Some("png") => Format::Png,
            None => Format::PngDir,
            Some(_) if path.is_dir() => Format::PngDir,
            Some(e) => bail!("output {}: unknown format \".{e}\": use .mp4, .gif, .png (videos of one frame), .safetensors, or a name without an extension for a directory of PNG frames", path.display()),
        })
    }
}

/// Checks, before any heavy work, that `path` can be written in its format
/// for videos of `frames` frames.
pub fn check_writable(path: &Path, frames: usize) -> Result<Format> {
    let fmt = Format::of(path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    ensure!(dir.is_dir(), "output {}: directory {} does not exist", path.display(), dir.display());
    let probe = dir.join(format!(".qc-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("output {}: {} is not writable", path.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    match fmt {
        Format::PngDir if path.exists() && !path.is_dir() => bail!("output {}: exists and is not a directory (use .gif, .mp4 or .safetensors for files)", path.display()),
        Format::PngDir if path.is_dir() => check_replaceable(path)?,
        Format::Png => ensure_one_frame(path, frames)?,
        Format::Mp4 => {
            find_ffmpeg().with_context(|| format!("output {}", path.display()))?;
        }
        _ => {}
    }
    Ok(fmt)
}

fn ensure_one_frame(path: &Path, frames: usize) -> Result<()> {
    ensure!(frames == 1, "output {}: a .png holds one frame and the video has {frames}: use .gif, .mp4, or a name without an extension for a directory of PNG frames", path.display());
    Ok(())
}

/// Whether `name` is a frame file [`write_video`] writes into a directory:
/// `sample` and at least 2 digits, `_frame` and at least 4 digits, `.png`.
fn is_frame_file(name: &str) -> bool {
    let digits = |s: &str, min: usize| s.len() >= min && s.bytes().all(|c| c.is_ascii_digit());
    name.strip_prefix("sample").and_then(|r| r.strip_suffix(".png")).and_then(|r| r.split_once("_frame")).is_some_and(|(b, t)| digits(b, 2) && digits(t, 4))
}

/// An existing directory is replaced by new frames only when it is empty or
/// holds nothing but an earlier run's frames: anything else is the user's and
/// is never deleted.
fn check_replaceable(dir: &Path) -> Result<()> {
    let context = || format!("output {}: reading the existing directory", dir.display());
    for entry in std::fs::read_dir(dir).with_context(context)? {
        let entry = entry.with_context(context)?;
        let name = entry.file_name().to_string_lossy().to_string();
        ensure!(
            entry.file_type().with_context(context)?.is_file() && is_frame_file(&name),
            "output {}: an existing directory that holds {name:?}, which is not a frame this tool writes; PNG frames replace a directory only when it is empty or holds an earlier run's frames alone: give a new directory",
            dir.display()
        );
    }
    Ok(())
}

fn find_ffmpeg() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("ffmpeg"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("writing .mp4 needs ffmpeg on PATH (not found); use .gif, a directory of PNG frames, or .safetensors"))
}

/// Open-Sora's save path: `uint8(clamp((x + 1) / 2, 0, 1) * 255 + 0.5)`.
pub fn quantize_frames(video: &Tensor) -> Result<Tensor> {
    let v = video.f32()?;
    let q: Vec<u8> = v.iter().map(|&x| (((x.clamp(-1.0, 1.0) + 1.0) / 2.0) * 255.0 + 0.5).floor().clamp(0.0, 255.0) as u8).collect();
    Tensor::new(video.shape(), Storage::U8(q))
}

/// `[B, C, T, H, W]` enlarged `k` times along H and W by repeating pixels.
pub fn upscale_nearest(video: &Tensor, k: usize) -> Result<Tensor> {
    let s = video.shape();
    ensure!(s.len() == 5 && k >= 1, "upscale expects [B, C, T, H, W] and a factor >= 1");
    let (h, w) = (s[3], s[4]);
    let v = video.f32()?;
    let mut out = Vec::with_capacity(v.len() * k * k);
    for plane in v.chunks(h * w) {
        for y in 0..h * k {
            let row = &plane[(y / k) * w..][..w];
            for x in 0..w * k {
                out.push(row[x / k]);
            }
        }
    }
    Tensor::from_f32(&[s[0], s[1], s[2], h * k, w * k], out)
}

/// Interleaved RGB frames of sample `b` from `[B, 3, T, H, W]` uint8.
pub fn rgb_frames(frames: &Tensor, b: usize) -> Result<Vec<Vec<u8>>> {
    let s = frames.shape();
    ensure!(s.len() == 5 && s[1] == 3, "video frames must be [B, 3, T, H, W], got {s:?}");
    let Storage::U8(data) = frames.storage() else { bail!("video frames must be uint8") };
    let (t, h, w) = (s[2], s[3], s[4]);
    let plane = t * h * w;
    Ok((0..t)
        .map(|ti| {
            let mut rgb = vec![0u8; h * w * 3];
            for p in 0..h * w {
                for c in 0..3 {
                    rgb[p * 3 + c] = data[(b * 3 + c) * plane + ti * h * w + p];
                }
            }
            rgb
        })
        .collect())
}

/// Path of sample `b` of `n`: the path itself for one sample, else `stem-b.ext`.
pub fn sample_path(path: &Path, b: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let name = match path.extension() {
        Some(e) => format!("{stem}-{b}.{}", e.to_string_lossy()),
        None => format!("{stem}-{b}"),
    };
    path.with_file_name(name)
}

pub(crate) fn png_bytes(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
    }
    Ok(out)
}

fn gif_bytes(frames: &[Vec<u8>], w: usize, h: usize, fps: f32) -> Result<Vec<u8>> {
    ensure!(w <= u16::MAX as usize && h <= u16::MAX as usize, "GIF frames are limited to 65535 pixels per side");
    let mut out = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut out, w as u16, h as u16, &[])?;
        enc.set_repeat(gif::Repeat::Infinite)?;
        let delay = (100.0 / fps.max(1.0)).round().max(1.0) as u16;
        for rgb in frames {
            let mut f = gif::Frame::from_rgb_speed(w as u16, h as u16, rgb, 10);
            f.delay = delay;
            enc.write_frame(&f)?;
        }
    }
    Ok(out)
}

fn write_mp4(path: &Path, frames: &[Vec<u8>], w: usize, h: usize, fps: f32) -> Result<()> {
    use std::io::Write;
    let ffmpeg = find_ffmpeg()?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}.mp4", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let mut child = std::process::Command::new(ffmpeg)
        .args(["-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &format!("{w}x{h}"), "-r", &fps.to_string(), "-i", "-"])
        .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18"])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting ffmpeg")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    for f in frames {
        stdin.write_all(f).context("sending frames to ffmpeg")?;
    }
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!("ffmpeg failed ({status}) writing {}", path.display());
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Writes `video` (`[B, 3, T, H, W]` in about [-1, 1]) to `path` in the format
/// its extension names; returns the files written.
pub fn write_video(path: &Path, video: &Tensor, fps: f32) -> Result<Vec<PathBuf>> {
    let frames = quantize_frames(video)?;
    let s = video.shape().to_vec();
    ensure!(s.len() == 5 && s[1] == 3, "video must be [B, 3, T, H, W], got {s:?}");
    let (n, h, w) = (s[0], s[3], s[4]);
    let format = Format::of(path)?;
    match format {
        Format::Safetensors => {
            write_safetensors(path, &[("video".into(), video.clone()), ("frames_u8".into(), frames)], None)?;
            Ok(vec![path.to_path_buf()])
        }
        Format::Gif | Format::Mp4 | Format::Png => {
            if format == Format::Png {
                ensure_one_frame(path, s[2])?;
            }
            let mut written = Vec::new();
            for b in 0..n {
                let p = sample_path(path, b, n);
                let rgb = rgb_frames(&frames, b)?;
                match format {
                    Format::Gif => write_atomic(&p, &gif_bytes(&rgb, w, h, fps)?)?,
                    Format::Png => write_atomic(&p, &png_bytes(&rgb[0], w, h)?)?,
                    _ => write_mp4(&p, &rgb, w, h, fps)?,
                }
                written.push(p);
            }
            Ok(written)
        }
        Format::PngDir => {
            // Frames go to a temporary directory renamed into place when complete.
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
            let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            let result = (|| -> Result<()> {
                std::fs::create_dir_all(&tmp)?;
                for b in 0..n {
                    for (t, rgb) in rgb_frames(&frames, b)?.iter().enumerate() {
                        std::fs::write(tmp.join(format!("sample{b:02}_frame{t:04}.png")), png_bytes(rgb, w, h)?)?;
                    }
                }
                // Checked again now: the directory may have changed while the video was made.
                let replacing = path.is_dir();
                if replacing {
                    check_replaceable(path)?;
                    std::fs::rename(path, &old)?;
                }
                if let Err(e) = std::fs::rename(&tmp, path) {
                    if replacing {
                        let _ = std::fs::rename(&old, path);
                    }
                    return Err(e.into());
                }
                if replacing {
                    // Only an earlier run's frames (checked above).
                    let _ = std::fs::remove_dir_all(&old);
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e.context(format!("writing PNG frames to {}", path.display())));
            }
            Ok(vec![path.to_path_buf()])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn quantization_follows_the_save_path() {
        let v = Tensor::from_f32(&[1, 3, 1, 1, 3], vec![-2.0, -1.0, 0.0, 1.0, 3.0, 0.5, -0.5, 0.999, -0.999]).unwrap();
        let Storage::U8(q) = quantize_frames(&v).unwrap().storage().clone() else { panic!() };
        assert_eq!(q, vec![0, 0, 128, 255, 255, 191, 64, 255, 0]);
    }

    #[test]
    fn upscaling_repeats_pixels() {
        let v = Tensor::from_f32(&[1, 1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let u = upscale_nearest(&v, 2).unwrap();
        assert_eq!(u.shape(), [1, 1, 1, 4, 4]);
        assert_eq!(u.f32().unwrap(), &[1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0]);
    }

    #[test]
    fn every_format_round_trips_or_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(3);
        let (b, t, h, w) = (2, 3, 5, 7);
        let video = Tensor::from_f32(&[b, 3, t, h, w], (0..b * 3 * t * h * w).map(|_| rng.normal() * 0.5).collect()).unwrap();
        let frames = quantize_frames(&video).unwrap();

        let st = dir.path().join("v.safetensors");
        write_video(&st, &video, 24.0).unwrap();
        let ck = crate::checkpoint::Checkpoint::open_file(&st).unwrap();
        assert_eq!(ck.load_f32("video").unwrap().f32().unwrap(), video.f32().unwrap());

        let pngs = dir.path().join("frames");
        write_video(&pngs, &video, 24.0).unwrap();
        let f = std::fs::File::open(pngs.join("sample01_frame0002.png")).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(f)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, rgb_frames(&frames, 1).unwrap()[2]);

        let g = dir.path().join("v.gif");
        let written = write_video(&g, &video, 24.0).unwrap();
        assert_eq!(written, vec![dir.path().join("v-0.gif"), dir.path().join("v-1.gif")]);
        let mut d = gif::DecodeOptions::new();
        d.set_color_output(gif::ColorOutput::RGBA);
        let mut dec = d.read_info(std::fs::File::open(&written[1]).unwrap()).unwrap();
        let mut n = 0;
        while let Some(fr) = dec.read_next_frame().unwrap() {
            assert_eq!((fr.width as usize, fr.height as usize), (w, h));
            n += 1;
        }
        assert_eq!(n, t);
        // No temporary files remain.
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')));
    }

    #[test]
    fn unwritable_outputs_are_refused_early() {
        assert!(check_writable(Path::new("/nonexistent-dir/x.gif"), 8).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_writable(&file, 8).unwrap_err().to_string().contains("not a directory"));
        assert_eq!(check_writable(&dir.path().join("a.safetensors"), 8).unwrap(), Format::Safetensors);
        let e = check_writable(&dir.path().join("a.avi"), 8).unwrap_err().to_string();
        assert!(e.contains("unknown format \".avi\""), "{e}");
        assert!(check_writable(&dir.path().join("a.png"), 8).unwrap_err().to_string().contains("the video has 8"));
        assert_eq!(check_writable(&dir.path().join("a.PNG"), 1).unwrap(), Format::Png);
        // An existing directory, whatever its name, is a frame directory.
        std::fs::create_dir(dir.path().join("frames.v2")).unwrap();
        assert_eq!(check_writable(&dir.path().join("frames.v2"), 8).unwrap(), Format::PngDir);
    }

    /// A directory is replaced by frames only when empty or holding an earlier
    /// run's frames alone: anything else in it is refused, before the run and
    /// at the write, and left as it was.
    #[test]
    fn frames_never_replace_a_directory_holding_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let video = Tensor::from_f32(&[1, 3, 2, 2, 2], vec![0.1; 24]).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert_eq!(check_writable(&out, 2).unwrap(), Format::PngDir);
        write_video(&out, &video, 8.0).unwrap();
        // An earlier run's frames (more of them than now) are replaced.
        std::fs::write(out.join("sample00_frame0009.png"), b"old").unwrap();
        write_video(&out, &video, 8.0).unwrap();
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&out), ["sample00_frame0000.png", "sample00_frame0001.png"]);
        for foreign in ["notes.txt", "sample00_frame0000.png.bak", "sample0_frame0000.png", "sample00_frame000.png", "sub"] {
            let p = out.join(foreign);
            if foreign == "sub" {
                std::fs::create_dir(&p).unwrap();
            } else {
                std::fs::write(&p, b"mine").unwrap();
            }
            let e = check_writable(&out, 2).unwrap_err().to_string();
            assert!(e.contains(&format!("{foreign:?}")) && e.contains("give a new directory"), "{e}");
            let e = format!("{:#}", write_video(&out, &video, 8.0).unwrap_err());
            assert!(e.contains("not a frame this tool writes"), "{e}");
            assert!(p.exists() && names(&out).len() == 3, "{foreign}: the directory changed");
            if foreign == "sub" {
                std::fs::remove_dir(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        // Nothing temporary is left beside it.
        assert_eq!(names(dir.path()), ["out"]);
        for (name, frame) in [("sample00_frame0000.png", true), ("sample123_frame12345.png", true), ("sample00_frame0000.gif", false), ("xsample00_frame0000.png", false), ("sampleAB_frame0000.png", false)] {
            assert_eq!(is_frame_file(name), frame, "{name}");
        }
    }

    /// `.png` writes one file per video of one frame, and refuses more frames at the write too.
    #[test]
    fn png_files_hold_one_frame() {
        let dir = tempfile::tempdir().unwrap();
        let video = Tensor::from_f32(&[2, 3, 1, 2, 3], (0..36).map(|i| i as f32 / 36.0 - 0.5).collect()).unwrap();
        let frames = quantize_frames(&video).unwrap();
        let written = write_video(&dir.path().join("img.png"), &video, 8.0).unwrap();
        assert_eq!(written, [dir.path().join("img-0.png"), dir.path().join("img-1.png")]);
        let f = std::fs::File::open(&written[1]).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(f)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, rgb_frames(&frames, 1).unwrap()[0]);
        let two = Tensor::from_f32(&[1, 3, 2, 2, 2], vec![0.0; 24]).unwrap();
        assert!(write_video(&dir.path().join("two.png"), &two, 8.0).unwrap_err().to_string().contains("the video has 2"));
    }
}
