pub mod stdit3;
pub mod t5;
pub mod vae;
