pub mod stdit3;
